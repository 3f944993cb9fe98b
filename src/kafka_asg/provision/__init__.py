"""Idempotent provisioning of a cluster's AWS resources: ``plan``, ``up``, ``down``."""

from kafka_asg.provision.apply import down, plan, up
from kafka_asg.provision.clients import AwsClients, CallCounter, aws_clients
from kafka_asg.provision.plan import Change, Plan

__all__ = ["AwsClients", "CallCounter", "Change", "Plan", "aws_clients", "down", "plan", "up"]

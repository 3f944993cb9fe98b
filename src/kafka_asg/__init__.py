"""kafka-asg: a self-healing ZooKeeper + Kafka cluster on an EC2 Auto Scaling group.

Slots, not servers: every slot is a subnet, a pre-created ENI with a fixed private IP, a ZooKeeper
``myid`` / Kafka ``broker.id`` and (optionally) its own EBS volumes. Instances come and go; a booting
instance claims the free slot of its subnet and becomes that node.
"""

__version__ = "0.1.0"

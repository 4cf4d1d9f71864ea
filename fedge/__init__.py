"""fedge: federated and edge adaptation of models.

The core shared by every role: models, adapters, codecs, the update envelope,
device profiles, scenarios' interface and the CLI. Roles live in sub-packages
(`fedge.server`, `fedge.client`, `fedge.edge`, `fedge.sim`) and import this core,
never each other.
"""

__version__ = "0.1.0"

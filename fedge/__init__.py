"""fedge: federated and edge adaptation of models.

The core (settings, the message contract, codecs, the federated model, training
loops, the scenario interface, results) lives here; the roles (`fedge.server`,
`fedge.client`, `fedge.edge`, `fedge.sim`) and the wire contract (`fedge.protos`)
are folders beside this one, mapped into the namespace by the installer.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# Flower runs an app from its bundle (FAB), which holds this folder and the role folders side by side (it
# leaves out links). Look for the roles there, so a deployed ServerApp or ClientApp runs the bundle's own code
# rather than mixing it with whatever copy is installed.
_root = _Path(__file__).parent.parent
if not (_Path(__file__).parent / "server").is_dir() and (_root / "server" / "__init__.py").is_file():
    __path__.append(str(_root))

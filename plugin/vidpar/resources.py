"""Files shipped inside the package."""

from pathlib import Path

#: The Hydra configs of vidpar's commands: ``vidpar/conf`` links to the checkout's
#: ``conf/``; wheels carry a copy.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

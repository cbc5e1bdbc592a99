"""Example training configs: `coconut-fast train <this folder>/prosqa_coconut.yaml`."""
from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def config_path(name: str) -> Path:
    """Path of a bundled config, e.g. config_path("tiny.yaml")."""
    path = CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"no bundled config {name!r}; have {sorted(p.name for p in CONFIG_DIR.glob('*.yaml'))}")
    return path

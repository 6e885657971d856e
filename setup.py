"""Ships the debug configs, the demo tokenizer and the demo data inside the package.

git keeps one copy of each, at the repository paths (`train_configs/`, `assets/tokenizer/`,
`assets/demo/`); the wheel maps them to `torchtitan_mot/_shipped/...`, where
`torchtitan_mot.config.shipped_root` finds them, so an installed package trains
`--job.config_file debug_mot.toml` from any directory. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

SHIPPED = {
    "torchtitan_mot._shipped.train_configs": "train_configs",
    "torchtitan_mot._shipped.assets.tokenizer": "assets/tokenizer",
    "torchtitan_mot._shipped.assets.demo": "assets/demo",
}

setup(
    packages=find_packages(include=["torchtitan_mot*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={name: ["**/*"] for name in SHIPPED},
)

"""Shared pytest setup: logical CPU devices and the real-data fixtures.

The CPU is split into four logical devices before TensorFlow initializes its
runtime, so tests can build a real `tf.distribute.MirroredStrategy` over two
or four replicas. Tests that use the default strategy see the same devices
and run on the first one.
"""

import os
import tarfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Real images live beside the checkout, never inside it. CLARS_TF_SHARED_DATA
# points elsewhere on machines with another layout.
SHARED_DATA_DIR = Path(
    os.environ.get("CLARS_TF_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")
)


def logical_cpus(count):
    """Return the names of the first `count` logical CPU devices."""
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < count:
        pytest.skip(f"needs {count} logical CPU devices, found {len(devices)}")
    return [device.name for device in devices[:count]]


def mirrored_strategy(replicas):
    """Return a new MirroredStrategy over the first `replicas` logical CPUs.

    Collective group keys start at the same value for every new strategy, so
    a 4-device strategy after a 2-device one in the same process fails with
    "joining a group with size 4, but that group has size 2". Moving the key
    base for each strategy, as TensorFlow's own strategy tests do, keeps
    their groups apart.
    """
    devices = logical_cpus(replicas)
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture(scope="session")
def imagenet_sample_dir():
    """Folder with one real ImageNet JPEG per class: `train/<wnid>/*.JPEG`."""
    path = SHARED_DATA_DIR / "imagenet-sample"
    if not (path / "train").is_dir():
        pytest.skip(
            f"real ImageNet sample not found at {path}/train; set "
            "CLARS_TF_SHARED_DATA to the folder that holds imagenet-sample/"
        )
    return path


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory):
    """CIFAR-10 as JPEG folders (`train/<class>/`, `test/<class>/`), extracted once."""
    archive = SHARED_DATA_DIR / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(
            f"CIFAR-10 JPEG archive not found at {archive}; set "
            "CLARS_TF_SHARED_DATA to the folder that holds cifar10-jpeg.tar.gz"
        )
    target = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:  # Python releases before the extraction filters existed.
            tar.extractall(target)
    if not (target / "train").is_dir():
        pytest.fail(f"{archive} holds no top-level train/ folder")
    return target


def pytest_sessionfinish(session, exitstatus):
    """Fail a run in which no test passed, so an all-skipped suite is not green."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or exitstatus != 0:
        return
    if not reporter.stats.get("passed"):
        session.exitstatus = 1

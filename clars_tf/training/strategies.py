"""The tf.distribute strategy of a run, and the checks that depend on it."""

import logging

import tensorflow as tf

from clars_tf.training.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


def split_cpu(replicas: int) -> None:
    """Split the first CPU into `replicas` logical devices for MirroredStrategy.

    Must run before TensorFlow initializes its devices, so before any op or
    variable is created. Lets a machine without accelerators test a
    multi-replica run.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas
        )
    except RuntimeError as error:
        existing = len(tf.config.list_logical_devices("CPU"))
        if existing >= replicas:
            return  # Already split, for example by an earlier run in this process.
        raise ConfigError(
            f"--cpu_replicas={replicas} cannot split the CPU: TensorFlow is already "
            f"initialized with {existing} logical CPU devices ({error})."
        ) from None


def create_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """Return the strategy that `config.strategy` names."""
    if config.cpu_replicas:
        split_cpu(config.cpu_replicas)

    if config.strategy == "default":
        return tf.distribute.get_strategy()
    if config.strategy == "one_device":
        accelerators = tf.config.list_logical_devices("GPU")
        device = accelerators[0].name if accelerators else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if config.strategy == "mirrored":
        devices = None  # All GPUs.
        if config.cpu_replicas:
            cpus = tf.config.list_logical_devices("CPU")
            devices = [d.name for d in cpus[: config.cpu_replicas]]
        return tf.distribute.MirroredStrategy(devices)
    if config.strategy == "multi_worker_mirrored":
        # The cluster comes from TF_CONFIG; without it this is one worker.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if config.strategy == "tpu":
        # NOTE: no TPU was available to run this branch; it follows the
        # TPUStrategy setup documented for TensorFlow 2.16 to 2.21.
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu)
        except ValueError as error:
            raise ConfigError(
                f"--tpu={config.tpu!r} failed to resolve to a TPU ({error}). Pass the TPU "
                "name, its grpc:// address, or 'local' on a TPU VM."
            ) from None
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"unknown --strategy={config.strategy!r}")


def check_batch_split(config: TrainConfig, strategy: tf.distribute.Strategy) -> None:
    """Raise ConfigError unless every replica gets the same whole batch."""
    replicas = strategy.num_replicas_in_sync
    if config.global_batch_size % replicas:
        raise ConfigError(
            f"--global_batch_size={config.global_batch_size} is not divisible by the "
            f"{replicas} replicas of --strategy={config.strategy}; use a multiple of {replicas}."
        )
    if config.complete_norm_source == "replica" and replicas < 2:
        raise ConfigError(
            "--complete_norm_source=replica needs two or more replicas; "
            f"--strategy={config.strategy} has {replicas}. Use --strategy=mirrored "
            "(with --cpu_replicas=2 on a CPU), or another complete-norm source."
        )

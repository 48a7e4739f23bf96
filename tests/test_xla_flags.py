"""The profile-guided XLA:CPU default is applied only when it is safe to."""

from dpn_jax.xla_flags import YNN_OFF, cpu_defaults


def test_added_to_the_users_flags_on_a_known_jaxlib():
    assert cpu_defaults({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, "0.10.2") == \
        f"--xla_force_host_platform_device_count=8 {YNN_OFF}"
    assert cpu_defaults({}, "0.10.2") == YNN_OFF


def test_left_alone_when_the_user_decides_or_the_flag_may_not_exist():
    assert cpu_defaults({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}, "0.10.2") is None
    assert cpu_defaults({"DPN_JAX_XLA_DEFAULTS": "0"}, "0.10.2") is None
    assert cpu_defaults({}, "0.11.0") is None  # an unknown flag would abort XLA


def test_the_running_process_got_it():
    """conftest imports dpn_jax before jax's backend starts, so the suite runs with the default."""
    import os

    import jax

    jax.devices()
    if cpu_defaults({}, None) is not None:
        assert YNN_OFF in os.environ["XLA_FLAGS"]

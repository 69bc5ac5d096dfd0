"""One Prefect test server and one 2-worker Dask LocalCluster for the whole session."""

import os

import pytest

from ..conftest import TINY_CONFIG


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary SQLite); yields its URL for subprocess runs."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(get_current_settings().api.url)


@pytest.fixture(scope="session")
def dask_address():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def tiny_backbone():
    from musc_tasks.config import BackboneSpec

    # 224 px (16x16 patches): even random weights then separate the demo's planted defects
    return BackboneSpec(
        name="musc-tiny-vit", pretrained=None, image_size=224, layers=(1, 3), model_config_path=TINY_CONFIG
    )


@pytest.fixture(scope="session")
def demo_day(tmp_path_factory):
    from musc_tasks.demo import make_demo_day

    return make_demo_day(tmp_path_factory.mktemp("day"), seed=1, images_per_product=10, defects_per_product=2)


def subprocess_env(api_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_API_URL=api_url, HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env

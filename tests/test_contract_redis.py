"""The backend contract suite run on Redis 7, Valkey and a 3-primary Cluster of each."""

import pytest

from chatstate.state._redis import AsyncRedisBackend, RedisBackend
from chatstate.testing import BackendContract

pytestmark = pytest.mark.redis


class TestRedisBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _store(self, redis_url: str, namespace: str) -> None:
        self.url = redis_url
        self.namespace = namespace

    def make_backend(self) -> RedisBackend:
        return RedisBackend.from_url(self.url, namespace=self.namespace)

    def make_async_backend(self) -> AsyncRedisBackend:
        return AsyncRedisBackend.from_url(self.url, namespace=self.namespace)


@pytest.mark.cluster
class TestRedisClusterBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _store(self, cluster_url: str, namespace: str) -> None:
        self.url = cluster_url
        self.namespace = namespace

    def make_backend(self) -> RedisBackend:
        return RedisBackend.from_url(self.url, namespace=self.namespace, cluster=True)

    def make_async_backend(self) -> AsyncRedisBackend:
        return AsyncRedisBackend.from_url(self.url, namespace=self.namespace, cluster=True)

"""The backend contract suite run on Redis 7, Valkey and a 3-primary Cluster of each."""

import pytest

from chatstate import StateService
from chatstate.exceptions import ConfigurationError
from chatstate.state import AsyncRedisBackend, RedisBackend
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


class TestRedisPythonParser(BackendContract):
    """The contract with redis-py's pure-Python reply parser: reads go through the load script."""

    @pytest.fixture(autouse=True)
    def _store(self, redis_url: str, namespace: str) -> None:
        import redis._parsers as parsers
        from redis.connection import DEFAULT_RESP_VERSION

        self.url = redis_url
        self.namespace = namespace
        self.sync_parser = getattr(parsers, f"_RESP{DEFAULT_RESP_VERSION}Parser")
        self.async_parser = getattr(parsers, f"_AsyncRESP{DEFAULT_RESP_VERSION}Parser")

    def make_backend(self) -> RedisBackend:
        backend = RedisBackend.from_url(
            self.url, namespace=self.namespace, parser_class=self.sync_parser
        )
        assert not backend._plain_reads
        return backend

    def make_async_backend(self) -> AsyncRedisBackend:
        backend = AsyncRedisBackend.from_url(
            self.url, namespace=self.namespace, parser_class=self.async_parser
        )
        assert not backend._plain_reads
        return backend


class TestRedisPseudonymousKeys(BackendContract):
    """The contract with key_secret: keys carry an HMAC of the user id, never the id."""

    listing = False  # the keys do not turn back into user ids

    @pytest.fixture(autouse=True)
    def _store(self, redis_url: str, namespace: str) -> None:
        self.url = redis_url
        self.namespace = namespace

    def make_backend(self) -> RedisBackend:
        return RedisBackend.from_url(self.url, namespace=self.namespace, key_secret=SECRET)

    def make_async_backend(self) -> AsyncRedisBackend:
        return AsyncRedisBackend.from_url(self.url, namespace=self.namespace, key_secret=SECRET)

    def test_users_is_refused_with_a_reason(self) -> None:
        backend = self.make_backend()
        try:
            svc = StateService(backend)
            svc.update("ann", {"a": 1})
            with pytest.raises(ConfigurationError, match="key_secret cannot list users"):
                list(svc.users())
        finally:
            backend.close()


SECRET = "a key secret of the bot, 32 bytes"

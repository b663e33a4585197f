"""chatstate as python-telegram-bot 22's persistence, under a real Application.

The bot's requests are answered locally by a recording ``BaseRequest`` (no
network). A ``ConversationHandler`` runs across a restart and across two
Applications sharing one store; PTB's own ``PicklePersistence`` on one shared
file, and two plain Applications, are the negative controls.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from telegram import Update
from telegram.ext import (
    Application,
    ApplicationBuilder,
    BasePersistence,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    PersistenceInput,
    PicklePersistence,
    filters,
)
from telegram.request import BaseRequest, RequestData

from chatstate import AsyncMemoryBackend, AsyncRedisBackend, AsyncStateService, SerializationError
from chatstate.integrations.telegram import (
    ChatstateApplication,
    ChatstatePersistence,
    apply_changes,
    changes_between,
)
from strategies import documents

TOKEN = "42:TEST-TOKEN"
NAME, AGE = range(2)
ANA, BEA = 7, 8


class RecordingRequest(BaseRequest):
    """Answers every Bot API call locally and records it (no network)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self._ids = itertools.count(1000)

    @property
    def read_timeout(self) -> float | None:
        return None

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def do_request(
        self, url: str, method: str, request_data: RequestData | None = None, *args, **kwargs
    ) -> tuple[int, bytes]:
        endpoint = url.rsplit("/", 1)[-1]
        params = dict(request_data.parameters) if request_data else {}
        self.sent.append((endpoint, params))
        result: Any = True
        if endpoint == "getMe":
            result = {"id": 42, "is_bot": True, "first_name": "Test", "username": "test_bot"}
        elif endpoint == "sendMessage":
            chat = {"id": params["chat_id"], "type": "private"}
            result = {
                "message_id": next(self._ids),
                "date": int(time.time()),
                "chat": chat,
                "text": params["text"],
            }
        return 200, json.dumps({"ok": True, "result": result}).encode()

    @property
    def texts(self) -> list[str]:
        return [p["text"] for endpoint, p in self.sent if endpoint == "sendMessage"]


_update_ids = itertools.count(1)


def message(app: Application, text: str, user: int = ANA) -> Update:
    """A private-chat text message from ``user``, as Telegram sends it."""
    entities = [{"type": "bot_command", "offset": 0, "length": len(text)}]
    data = {
        "update_id": next(_update_ids),
        "message": {
            "message_id": next(_update_ids),
            "date": int(time.time()),
            "chat": {"id": user, "type": "private"},
            "from": {"id": user, "is_bot": False, "first_name": "U"},
            "text": text,
            **({"entities": entities} if text.startswith("/") else {}),
        },
    }
    return Update.de_json(data, app.bot)


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    context.user_data["visits"] = context.user_data.get("visits", 0) + 1
    await update.message.reply_text("What is your name?")
    return NAME


async def got_name(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    context.user_data["name"] = update.message.text
    await update.message.reply_text("How old are you?")
    return AGE


async def got_age(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    await update.message.reply_text(f"{context.user_data['name']} is {update.message.text}")
    return ConversationHandler.END


async def remember(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/set_<key>: sets user_data[key], chat_data[key] and bot_data[key]; replies with all keys."""
    key = update.message.text.removeprefix("/set_")
    for data in (context.user_data, context.chat_data, context.bot_data):
        data[key] = True
    await update.message.reply_text(",".join(sorted(context.user_data)))


def build_app(
    persistence: BasePersistence, *, app_class: type[Application] = Application
) -> tuple[Application, RecordingRequest]:
    request = RecordingRequest()
    app = (
        ApplicationBuilder()
        .token(TOKEN)
        .request(request)
        .get_updates_request(RecordingRequest())
        .updater(None)
        .persistence(persistence)
        .application_class(app_class)
        .build()
    )
    text = filters.TEXT & ~filters.COMMAND
    app.add_handler(
        ConversationHandler(
            entry_points=[CommandHandler("start", start)],
            states={NAME: [MessageHandler(text, got_name)], AGE: [MessageHandler(text, got_age)]},
            fallbacks=[],
            name="form",
            persistent=True,
        )
    )
    app.add_handler(MessageHandler(filters.Regex(r"^/set_"), remember))
    return app, request


# -- on every backend --------------------------------------------------------------------


class _OnEveryBackend:
    """Tests that run on each backend; a subclass says how to make a service."""

    def make_service(self) -> AsyncStateService:
        """A new service over this test's store (the same store for every call)."""
        raise NotImplementedError

    def persistence(self, **kwargs: Any) -> ChatstatePersistence:
        return ChatstatePersistence(self.make_service(), close_service=True, **kwargs)

    def test_conversation_survives_a_restart(self) -> None:
        """A ConversationHandler started before a restart finishes after it, user_data and all."""

        async def main() -> tuple[list[str], list[str]]:
            app, first = build_app(self.persistence())
            async with app:
                await app.process_update(message(app, "/start"))
                await app.process_update(message(app, "Ana"))
            app2, second = build_app(self.persistence())
            async with app2:
                await app2.process_update(message(app2, "33"))
            return first.texts, second.texts

        first, second = asyncio.run(main())
        assert first == ["What is your name?", "How old are you?"]
        assert second == ["Ana is 33"]

    def test_two_applications_share_one_conversation(self) -> None:
        """Two running ChatstateApplications hand one user's conversation back and forth."""

        async def main() -> list[list[str]]:
            a, sent_a = build_app(self.persistence(), app_class=ChatstateApplication)
            b, sent_b = build_app(self.persistence(), app_class=ChatstateApplication)
            async with a, b:
                await a.process_update(message(a, "/start"))
                await b.process_update(message(b, "Ana"))
                await b.process_update(message(b, "/start", user=BEA))
                await a.process_update(message(a, "33"))
                await a.process_update(message(a, "Bea", user=BEA))
                await b.process_update(message(b, "40", user=BEA))
            return [sent_a.texts, sent_b.texts]

        texts_a, texts_b = asyncio.run(main())
        assert texts_a == ["What is your name?", "Ana is 33", "How old are you?"]
        assert texts_b == ["How old are you?", "What is your name?", "Bea is 40"]

    def test_plain_applications_do_not_share_a_conversation(self) -> None:
        """Negative control: plain Applications read conversations only at start-up."""

        async def main() -> list[str]:
            a, _ = build_app(self.persistence())
            b, sent_b = build_app(self.persistence())
            async with a, b:
                await a.process_update(message(a, "/start"))
                await a.update_persistence()
                await b.process_update(message(b, "Ana"))
            return sent_b.texts

        assert asyncio.run(main()) == []

    def test_two_applications_keep_each_others_keys(self) -> None:
        """Keys set by two Applications in one user's, chat's and the bot's data all survive."""

        async def main() -> tuple[list[str], dict[str, Any]]:
            a, sent_a = build_app(self.persistence(), app_class=ChatstateApplication)
            b, _ = build_app(self.persistence(), app_class=ChatstateApplication)
            async with a, b:
                await a.process_update(message(a, "/set_a"))
                await b.process_update(message(b, "/set_b"))
                await a.process_update(message(a, "/set_c"))
            svc = self.make_service()
            docs = {d: await svc.get(f"ptb:{d}") for d in (f"user:{ANA}", f"chat:{ANA}", "bot")}
            await svc.aclose()
            return sent_a.texts, docs

        texts, docs = asyncio.run(main())
        assert texts == ["a", "a,b,c"]
        assert all(doc == {"a": True, "b": True, "c": True} for doc in docs.values()), docs

    def test_refresh_keeps_changes_not_written_yet(self) -> None:
        """A refresh brings in another writer's key and keeps this process's unwritten one."""

        async def main() -> tuple[list[str], dict[str, Any]]:
            app, sent = build_app(self.persistence(update_interval=3600))
            other = self.make_service()
            async with app:
                await app.process_update(message(app, "/set_mine"))
                await other.assign(f"ptb:user:{ANA}", {"theirs": 1})
                await app.process_update(message(app, "/set_again"))
            stored = await other.get(f"ptb:user:{ANA}")
            await other.aclose()
            return sent.texts, stored

        texts, stored = asyncio.run(main())
        assert texts == ["mine", "again,mine,theirs"]
        assert stored == {"mine": True, "theirs": 1, "again": True}

    def test_conversations_are_stored_per_key(self) -> None:
        """Each conversation key is one field of the handler's document; END removes it."""

        async def main() -> list[dict[str, Any]]:
            app, _ = build_app(self.persistence(), app_class=ChatstateApplication)
            svc = self.make_service()
            seen = []
            async with app:
                await app.process_update(message(app, "/start"))
                await app.process_update(message(app, "/start", user=BEA))
                await app.process_update(message(app, "Bea", user=BEA))
                seen.append(await svc.get("ptb:conversation:form"))
                await app.process_update(message(app, "40", user=BEA))
                seen.append(await svc.get("ptb:conversation:form"))
            await svc.aclose()
            return seen

        during, after = asyncio.run(main())
        assert during == {f"[{ANA},{ANA}]": NAME, f"[{BEA},{BEA}]": AGE}
        assert after == {f"[{ANA},{ANA}]": NAME}


class TestOnMemory(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.store = AsyncMemoryBackend()

    def make_service(self) -> AsyncStateService:
        return AsyncStateService(self.store)


@pytest.mark.redis
class TestOnRedis(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str, namespace: str) -> None:
        self.url, self.namespace = redis_url, namespace

    def make_service(self) -> AsyncStateService:
        return AsyncStateService(AsyncRedisBackend.from_url(self.url, namespace=self.namespace))


def test_example_bot_runs_its_form_across_a_restart() -> None:
    """examples/ptb_bot.py's conversation continues on a new Application over the same store."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from ptb_bot import add_handlers

    async def main() -> list[str]:
        store, texts = AsyncMemoryBackend(), []
        for step in (["/start", "Ana"], ["33"]):
            request = RecordingRequest()
            app = (
                ApplicationBuilder()
                .token(TOKEN)
                .request(request)
                .get_updates_request(RecordingRequest())
                .updater(None)
                .persistence(ChatstatePersistence(AsyncStateService(store)))
                .application_class(ChatstateApplication)
                .build()
            )
            add_handlers(app)
            async with app:
                for text in step:
                    await app.process_update(message(app, text))
            texts += request.texts
        return texts

    assert asyncio.run(main()) == [
        "What is your name?",
        "How old are you?",
        "Nice to meet you, Ana.",
    ]


# -- PTB's own persistence: the lost keys we fix ---------------------------------------------


def test_pickle_persistence_loses_the_other_process_keys(tmp_path: Path) -> None:
    """Negative control: two Applications on one PicklePersistence file keep only one's keys."""

    async def main() -> dict[int, Any]:
        path = tmp_path / "bot.pickle"
        a, _ = build_app(PicklePersistence(path))
        b, _ = build_app(PicklePersistence(path))
        async with a, b:
            await a.process_update(message(a, "/set_a"))
            await b.process_update(message(b, "/set_b"))
            await a.update_persistence()
            await b.update_persistence()
        return await PicklePersistence(path).get_user_data()

    kept = asyncio.run(main())[ANA]
    assert kept in ({"a": True}, {"b": True})  # whoever wrote last; the other key is lost


# -- the persistence methods on their own ---------------------------------------------------


def test_every_abstract_method_is_implemented() -> None:
    """ChatstatePersistence is a complete BasePersistence."""
    assert not ChatstatePersistence.__abstractmethods__
    assert isinstance(ChatstatePersistence(AsyncStateService()), BasePersistence)


def test_update_writes_only_what_changed() -> None:
    """A write leaves keys it never saw, removes keys it saw go, stores None as null."""

    async def main() -> dict[str, Any]:
        svc = AsyncStateService()
        ours = ChatstatePersistence(svc)
        data: dict[str, Any] = {"keep": 1, "gone": 2, "nested": {"x": 1, "y": 1}}
        await ours.update_user_data(ANA, copy.deepcopy(data))
        await svc.assign("ptb:user:7", {"other": 3, ("nested", "z"): 3})
        del data["gone"]
        data["nested"]["x"] = 2
        data["null"] = None
        await ours.update_user_data(ANA, copy.deepcopy(data))
        return await svc.get("ptb:user:7")

    assert asyncio.run(main()) == {
        "keep": 1,
        "nested": {"x": 2, "y": 1, "z": 3},
        "null": None,
        "other": 3,
    }


def test_unchanged_data_writes_nothing() -> None:
    """Writing the data just read again sends no write (the version stays)."""

    async def main() -> list[int]:
        svc = AsyncStateService()
        await svc.update("ptb:bot", {"a": 1})
        ours = ChatstatePersistence(svc)
        data = await ours.get_bot_data()
        versions = [(await svc.snapshot("ptb:bot")).version]
        await ours.update_bot_data(data)
        versions.append((await svc.snapshot("ptb:bot")).version)
        return versions

    assert asyncio.run(main()) == [1, 1]


def test_non_json_data_reaches_the_error_handler_and_stores_nothing() -> None:
    """Nothing is pickled: a set in user_data fails its write, which PTB reports."""

    async def main() -> tuple[list[BaseException], dict[str, Any]]:
        svc = AsyncStateService()
        app, _ = build_app(ChatstatePersistence(svc))
        errors: list[BaseException] = []

        async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
            errors.append(context.error)

        async def bad(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            context.user_data["ok"] = 1
            context.user_data["bad"] = {1, 2}

        app.add_error_handler(on_error)
        app.add_handler(CommandHandler("bad", bad), group=-1)
        async with app:
            await app.process_update(message(app, "/bad"))
            await app.update_persistence()
        return errors, await svc.get(f"ptb:user:{ANA}")

    errors, stored = asyncio.run(main())
    assert [type(e) for e in errors] == [SerializationError]
    assert stored == {}


def test_callback_data_bot_data_and_drops_round_trip() -> None:
    """Callback data comes back as tuples; dropped users and chats are gone."""

    async def main() -> None:
        svc = AsyncStateService()
        ours = ChatstatePersistence(svc)
        assert await ours.get_callback_data() is None
        cache = ([("uuid-1", 1700000000.5, {"btn": "yes"})], {"query-1": "uuid-1"})
        await ours.update_callback_data(cache)
        await ours.update_user_data(ANA, {"a": 1})
        await ours.update_chat_data(ANA, {"c": 1})
        await ours.update_bot_data({"b": [1, 2]})
        again = ChatstatePersistence(svc)
        assert await again.get_callback_data() == cache
        assert await again.get_bot_data() == {"b": [1, 2]}
        await again.drop_user_data(ANA)
        await again.drop_chat_data(ANA)
        user: dict[str, Any] = {}
        chat: dict[str, Any] = {}
        await again.refresh_user_data(ANA, user)
        await again.refresh_chat_data(ANA, chat)
        assert user == chat == {}
        assert await again.get_user_data() == await again.get_chat_data() == {}

    asyncio.run(main())


def test_store_data_switches_kinds_off() -> None:
    """With user_data off, the Application neither loads nor writes user documents."""

    async def main() -> dict[str, Any]:
        svc = AsyncStateService()
        persistence = ChatstatePersistence(svc, store_data=PersistenceInput(user_data=False))
        app, _ = build_app(persistence, app_class=ChatstateApplication)
        async with app:
            await app.process_update(message(app, "/set_k"))
        return {d: await svc.get(f"ptb:{d}") for d in (f"user:{ANA}", f"chat:{ANA}")}

    assert asyncio.run(main()) == {f"user:{ANA}": {}, f"chat:{ANA}": {"k": True}}


def test_from_url_owns_its_service(redis_url: str, namespace: str) -> None:
    """from_url's service is closed at shutdown; a service passed in stays open."""

    async def main() -> None:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        await ChatstatePersistence(svc).flush()
        await svc.update("x", {"open": True})
        owned = ChatstatePersistence.from_url(redis_url, namespace=namespace, prefix="bot1")
        await owned.update_bot_data({"k": 1})
        assert await ChatstatePersistence(svc, prefix="bot1").get_bot_data() == {"k": 1}
        await owned.flush()
        await svc.aclose()

    asyncio.run(main())


# -- the pure change lists -----------------------------------------------------------------


@given(documents(), documents())
def test_changes_turn_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    """Applying changes_between(old, new) to old gives exactly new."""
    assert apply_changes(copy.deepcopy(old), changes_between(old, new)) == new


@given(documents(), documents(), documents())
def test_changes_replay_on_a_moved_document(
    base: dict[str, Any], local: dict[str, Any], stored: dict[str, Any]
) -> None:
    """Every path this process changed ends as it has it locally, whatever the store did."""
    changes = changes_between(base, local)
    result = apply_changes(copy.deepcopy(stored), changes)
    for path, _value in changes:
        assert _lookup(result, path) == _lookup(local, path)


def _lookup(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return "<missing>"
        doc = doc[key]
    return doc


def test_json_equality_tells_types_apart() -> None:
    """1, 1.0 and True are different values to the change list."""
    assert changes_between({"a": 1}, {"a": True}) == [(("a",), True)]
    assert changes_between({"a": 1}, {"a": 1.0}) == [(("a",), 1.0)]
    assert changes_between({"a": [1]}, {"a": [1]}) == []


@pytest.mark.redis
@pytest.mark.cluster
class TestOnCluster(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _server(self, cluster_url: str, namespace: str) -> None:
        self.url, self.namespace = cluster_url, namespace

    def make_service(self) -> AsyncStateService:
        backend = AsyncRedisBackend.from_url(self.url, namespace=self.namespace, cluster=True)
        return AsyncStateService(backend)

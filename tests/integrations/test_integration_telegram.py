"""chatstate as python-telegram-bot 22's persistence, under a real Application.

The bot's requests are answered locally by a recording ``BaseRequest`` (no
network). A ``ConversationHandler`` runs across a restart and across two
Applications sharing one store; PTB's own ``PicklePersistence`` on one shared
file, and two plain Applications, are the negative controls.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import itertools
import json
import sys
import time
from collections.abc import Iterator
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
from telegram.ext._utils.types import CDCData
from telegram.request import BaseRequest, RequestData

from chatstate import AsyncMemoryBackend, AsyncRedisBackend, AsyncSqliteBackend, AsyncStateService
from chatstate.exceptions import ConfigurationError, LockTimeoutError, SerializationError
from chatstate.integrations.telegram import (
    ChatstateApplication,
    ChatstatePersistence,
    apply_changes,
    changes_between,
    dedupe_key,
)
from conftest import register_secret
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


def payload(text: str, user: int = ANA) -> dict[str, Any]:
    """A private-chat text message from ``user``, as the JSON Telegram sends."""
    entities = [{"type": "bot_command", "offset": 0, "length": len(text)}]
    return {
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


def message(app: Application, text: str, user: int = ANA) -> Update:
    """A private-chat text message from ``user``, as ``app``'s bot receives it."""
    return Update.de_json(payload(text, user), app.bot)


def copy_for(app: Application, data: dict[str, Any]) -> Update:
    """One delivery of the update ``data`` to ``app`` (each process parses its own)."""
    return Update.de_json(copy.deepcopy(data), app.bot)


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    context.user_data["visits"] = context.user_data.get("visits", 0) + 1
    await update.message.reply_text("What is your name?")
    gate = context.application.bot_data.get("gate")  # a test holds this handler here
    if gate is not None:
        entered, go_on = gate
        entered.set()
        await go_on.wait()
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
    persistence: BasePersistence,
    *,
    app_class: type[Application] = Application,
    **options: Any,
) -> tuple[Application, RecordingRequest]:
    request = RecordingRequest()
    app = (
        ApplicationBuilder()
        .token(TOKEN)
        .request(request)
        .get_updates_request(RecordingRequest())
        .updater(None)
        .persistence(persistence)
        .application_class(app_class, kwargs=options)
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

    def test_erase_user_removes_their_documents_and_conversations_only(self) -> None:
        """Their data, private chat, conversations (new and old layout) go; others' stay."""

        async def main() -> tuple[list[str], list[str], dict[str, Any], dict[str, Any]]:
            ours = self.persistence()
            group = -100
            await ours.update_user_data(ANA, {"name": "Ana"})
            await ours.update_user_data(BEA, {"name": "Bea"})
            await ours.update_chat_data(ANA, {"private": True})
            await ours.update_chat_data(group, {"members": 2})
            await ours.update_bot_data({"users": 2})
            for key in ((ANA, ANA), (group, ANA), (group, BEA), (BEA, BEA)):
                await ours.update_conversation("form", key, 1)
            await ours.service.update(  # the old layout: one document per handler
                "ptb:conversation:old", {f"[{ANA},{ANA}]": 2, f"[{BEA},{BEA}]": 3}
            )
            erased = await ours.erase_user(ANA)
            left = sorted([doc_id async for doc_id in ours.service.users("ptb:")])
            old = await ours.service.get("ptb:conversation:old")
            conversations = await ours.get_conversations("form")
            await ours.flush()
            return erased, left, old, conversations

        erased, left, old, conversations = asyncio.run(main())
        assert erased == [
            f"ptb:chat:{ANA}",
            f"ptb:conversation:form:%5B-100,{ANA}%5D",
            f"ptb:conversation:form:%5B{ANA},{ANA}%5D",
            f"ptb:user:{ANA}",
        ]
        assert left == [
            "ptb:bot",
            "ptb:chat:-100",
            "ptb:conversation:form:%5B-100,8%5D",
            "ptb:conversation:form:%5B8,8%5D",
            "ptb:conversation:old",
            f"ptb:user:{BEA}",
        ]
        assert old == {f"[{BEA},{BEA}]": 3}
        assert conversations == {(-100, BEA): 1, (BEA, BEA): 1}

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
        """Each conversation key is a document of its own, marked by its update; END removes it."""

        async def main() -> list[Any]:
            persistence = self.persistence()
            app, _ = build_app(persistence, app_class=ChatstateApplication)
            svc = self.make_service()
            ana = persistence.conversation_key_doc("form", (ANA, ANA))
            bea = persistence.conversation_key_doc("form", (BEA, BEA))
            seen: list[Any] = []
            async with app:
                await app.process_update(message(app, "/start"))
                await app.process_update(message(app, "/start", user=BEA))
                bea_name = message(app, "Bea", user=BEA)
                await app.process_update(bea_name)
                seen += [await svc.get(ana), await svc.get(bea), f"update:{bea_name.update_id}"]
                await app.process_update(message(app, "40", user=BEA))
                seen += [await svc.get(bea), await svc.get("ptb:conversation:form")]
            await svc.aclose()
            return seen

        ana, bea, bea_update, bea_after, legacy = asyncio.run(main())
        assert bea == {"state": AGE, "update": bea_update, "before": NAME}
        assert ana["state"] == NAME
        assert "state" not in bea_after
        assert bea_after["before"] == AGE
        assert legacy == {}
        assert ana["update"] != bea_update

    def test_conversations_in_the_old_layout_are_read_and_moved(self) -> None:
        """A state stored by an earlier release (one document per handler) continues, then moves."""

        async def main() -> tuple[list[str], list[Any]]:
            svc = self.make_service()
            await svc.assign("ptb:conversation:form", {f"[{ANA},{ANA}]": AGE, "[9,9]": NAME})
            await svc.update(f"ptb:user:{ANA}", {"name": "Ana"})
            persistence = self.persistence()
            app, sent = build_app(persistence, app_class=ChatstateApplication)
            async with app:
                await app.process_update(message(app, "33"))
            key_doc = persistence.conversation_key_doc("form", (ANA, ANA))
            stored = [await svc.get("ptb:conversation:form"), await svc.get(key_doc)]
            await svc.aclose()
            return sent.texts, stored

        texts, (legacy, moved) = asyncio.run(main())
        assert texts == ["Ana is 33"]
        assert legacy == {"[9,9]": NAME}
        assert "state" not in moved  # moved to its own document, and ended

    def test_a_copy_of_an_update_is_handled_once(self) -> None:
        """The same update given to two Applications, one after and side by side, runs once."""

        async def main() -> tuple[list[str], list[str], dict[str, Any]]:
            a, sent_a = build_app(self.persistence(), app_class=ChatstateApplication)
            b, sent_b = build_app(self.persistence(), app_class=ChatstateApplication)
            async with a, b:
                start = payload("/start")
                await asyncio.gather(
                    a.process_update(copy_for(a, start)), b.process_update(copy_for(b, start))
                )
                await a.process_update(copy_for(a, start))
                name = payload("Ana")
                await b.process_update(copy_for(b, name))
                await a.process_update(copy_for(a, name))
            svc = self.make_service()
            user = await svc.get(f"ptb:user:{ANA}")
            await svc.aclose()
            return sent_a.texts, sent_b.texts, user

        texts_a, texts_b, user = asyncio.run(main())
        assert sorted(texts_a + texts_b) == ["How old are you?", "What is your name?"]
        assert user == {"visits": 1, "name": "Ana"}

    @pytest.mark.parametrize("fixed", [True, False])
    def test_a_slow_copy_of_start_does_not_reset_the_form(self, fixed: bool) -> None:
        """The issue's lost form: a copy of /start still running when the user answers.

        B's copy of /start is held inside its handler while A handles /start
        and the name. With the defaults, A's copy waits for B's and is then a
        duplicate, and the name waits for the user; the form ends "Ana is 33".
        The control (``dedupe_by=None, isolate=False``, python-telegram-bot as
        it comes) runs both copies: B's finishes last, sets the form back to
        the name, and the age is stored as the name.
        """

        async def main() -> tuple[list[str], dict[str, Any]]:
            options = {} if fixed else {"dedupe_by": None, "isolate": False}
            a, sent_a = build_app(self.persistence(), app_class=ChatstateApplication, **options)
            b, sent_b = build_app(self.persistence(), app_class=ChatstateApplication, **options)
            entered, go_on = asyncio.Event(), asyncio.Event()
            start = payload("/start")
            async with a, b:
                b.bot_data["gate"] = (entered, go_on)
                slow_copy = asyncio.create_task(b.process_update(copy_for(b, start)))
                await entered.wait()
                b.bot_data.pop("gate")
                answers = [copy_for(a, start), message(a, "Ana")]
                if fixed:  # A waits for B: let B go on whenever
                    both = asyncio.gather(*(a.process_update(u) for u in answers))
                    go_on.set()
                    await asyncio.gather(slow_copy, both)
                else:  # A runs first; then B's copy finishes
                    for update in answers:
                        await a.process_update(update)
                    go_on.set()
                    await slow_copy
                await a.process_update(message(a, "33"))
            svc = self.make_service()
            user = await svc.get(f"ptb:user:{ANA}")
            await svc.aclose()
            return sent_b.texts + sent_a.texts, user

        texts, user = asyncio.run(main())
        if fixed:
            assert texts == ["What is your name?", "How old are you?", "Ana is 33"]
            assert user == {"visits": 1, "name": "Ana"}
        else:
            assert texts.count("What is your name?") == 2
            assert "Ana is 33" not in texts
            assert user["name"] == "33"

    @pytest.mark.parametrize("isolate", [True, False])
    def test_one_users_updates_run_one_at_a_time(self, isolate: bool) -> None:
        """Two updates of one user on two Applications never overlap (False: the control)."""

        async def main() -> list[str]:
            events: list[str] = []
            both_in = asyncio.Barrier(2)

            async def slow(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
                text = update.message.text
                events.append(f"enter {text}")
                if not isolate:
                    async with asyncio.timeout(30):
                        await both_in.wait()  # only when both run at once
                for _ in range(20):
                    await asyncio.sleep(0)
                events.append(f"leave {text}")

            apps = []
            for _ in range(2):
                app, _ = build_app(
                    self.persistence(), app_class=ChatstateApplication, isolate=isolate
                )
                app.add_handler(MessageHandler(filters.Regex("^slow"), slow), group=-1)
                apps.append(app)
            a, b = apps
            async with a, b:
                await asyncio.gather(
                    a.process_update(message(a, "slow 1")), b.process_update(message(b, "slow 2"))
                )
            return events

        events = asyncio.run(main())
        assert len(events) == 4
        overlapped = events[0].startswith("enter") and events[1].startswith("enter")
        assert overlapped is not isolate, events

    def test_enum_states_and_tuples_survive_a_restart(self) -> None:
        """IntEnum and plain Enum states, enum and tuple values: stored as JSON, read back."""

        async def main() -> tuple[list[str], dict[str, Any], dict[str, Any]]:
            texts = []
            for step in (["/start", "Ana"], ["33"]):
                app, sent = build_enum_app(self.persistence())
                async with app:
                    for text in step:
                        await app.process_update(message(app, text))
                texts += sent.texts
            svc = self.make_service()
            user = await svc.get(f"ptb:user:{ANA}")
            persistence = self.persistence()
            conversation = await svc.get(persistence.conversation_key_doc("enum-form", (ANA, ANA)))
            await svc.aclose()
            return texts, user, conversation

        texts, user, conversation = asyncio.run(main())
        assert texts == ["What is your name?", "How old are you?", "Ana is 33 (plain, 1)"]
        assert user == {"name": "Ana", "tag": ["Ana", 1], "level": 1, "mode": "plain"}
        assert "state" not in conversation  # ended

    def test_start_up_loads_every_stored_user_and_chat(self) -> None:
        """Application.initialize loads each stored user's and chat's data, and no one else's."""

        async def main() -> tuple[dict[int, Any], dict[int, Any]]:
            writer, other_bot = self.persistence(), self.persistence(prefix="ptb2")
            await writer.update_user_data(ANA, {"lang": "es"})
            await writer.update_user_data(BEA, {"plan": "pro", "tags": ["a"]})
            await writer.update_chat_data(-100, {"title": "Group"})
            await writer.service.update("ptb:user:not-a-number", {"x": 1})
            await other_bot.update_user_data(99, {"x": 1})
            await writer.flush()
            await other_bot.flush()
            app, _ = build_app(self.persistence(), app_class=ChatstateApplication)
            async with app:
                return dict(app.user_data), dict(app.chat_data)

        users, chats = asyncio.run(main())
        assert users == {ANA: {"lang": "es"}, BEA: {"plan": "pro", "tags": ["a"]}}
        assert chats == {-100: {"title": "Group"}}

    def test_migrate_chat_data_moves_a_chat_no_update_loaded(self) -> None:
        """migrate_chat_data moves a chat stored before start-up that had no update here."""

        async def main() -> tuple[Any, Any]:
            writer = self.persistence()
            await writer.update_chat_data(-100, {"plan": "pro"})
            await writer.flush()
            app, _ = build_app(self.persistence())
            async with app:
                app.migrate_chat_data(old_chat_id=-100, new_chat_id=-100123)
                await app.update_persistence()
            reader = self.persistence()
            try:
                return await reader.get_chat_data(), await reader.service.get("ptb:chat:-100")
            finally:
                await reader.flush()

        chats, old = asyncio.run(main())
        assert chats == {-100123: {"plan": "pro"}}
        assert old == {}

    def test_a_migration_message_moves_a_chat_written_after_start_up(self) -> None:
        """The group's migration message moves the chat data another process wrote meanwhile."""

        async def migrate(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            context.application.migrate_chat_data(message=update.message)

        async def main() -> dict[int, Any]:
            app, _ = build_app(self.persistence(), app_class=ChatstateApplication)
            app.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, migrate))
            async with app:
                writer = self.persistence()  # another process, after this one started
                await writer.update_chat_data(-100, {"plan": "pro"})
                await writer.flush()
                data = payload("", user=ANA)
                del data["message"]["text"]
                data["message"]["chat"] = {"id": -100, "type": "group", "title": "G"}
                data["message"]["migrate_to_chat_id"] = -100123
                await app.process_update(Update.de_json(data, app.bot))
            reader = self.persistence()
            try:
                return await reader.get_chat_data()
            finally:
                await reader.flush()

        assert asyncio.run(main()) == {-100123: {"plan": "pro"}}


class Level(enum.IntEnum):
    NAME = 0
    AGE = 1


class Ask(enum.Enum):
    """Plain Enum states: equal to no stored value, so they must come back as themselves."""

    NAME = "name"
    AGE = "age"


def build_enum_app(persistence: ChatstatePersistence) -> tuple[Application, RecordingRequest]:
    """A form whose states are plain Enum members and whose data holds enums and tuples."""
    request = RecordingRequest()
    app = (
        ApplicationBuilder()
        .token(TOKEN)
        .request(request)
        .get_updates_request(RecordingRequest())
        .updater(None)
        .persistence(persistence)
        .application_class(ChatstateApplication)
        .build()
    )

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Ask:
        await update.message.reply_text("What is your name?")
        return Ask.NAME

    async def got_name(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Ask:
        name = update.message.text
        context.user_data.update(name=name, tag=(name, Level.AGE), level=Level.AGE, mode=Mode.PLAIN)
        await update.message.reply_text("How old are you?")
        return Ask.AGE

    async def got_age(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
        data = context.user_data
        assert data["level"] == Level.AGE  # the value, equal to the member
        assert data["mode"] == Mode.PLAIN
        await update.message.reply_text(
            f"{data['name']} is {update.message.text} ({data['mode']}, {data['tag'][1]})"
        )
        return ConversationHandler.END

    text = filters.TEXT & ~filters.COMMAND
    app.add_handler(
        ConversationHandler(
            entry_points=[CommandHandler("start", start)],
            states={
                Ask.NAME: [MessageHandler(text, got_name)],
                Ask.AGE: [MessageHandler(text, got_age)],
            },
            fallbacks=[],
            name="enum-form",
            persistent=True,
        )
    )
    return app, request


class Mode(enum.StrEnum):
    PLAIN = "plain"


class TestOnMemory(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.store = AsyncMemoryBackend()

    def make_service(self) -> AsyncStateService:
        return AsyncStateService(self.store)


class TestOnSqlite(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _store(self, tmp_path: Path) -> Iterator[None]:
        self.path = tmp_path / "state.db"
        self.opened: list[AsyncSqliteBackend] = []
        yield
        for backend in self.opened:  # a "restarted" process's service is dropped, not closed
            backend.store.close()

    def make_service(self) -> AsyncStateService:
        backend = AsyncSqliteBackend(self.path)
        self.opened.append(backend)
        return AsyncStateService(backend)


@pytest.mark.redis
class TestOnRedis(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str, namespace: str) -> None:
        self.url, self.namespace = redis_url, namespace

    def make_service(self) -> AsyncStateService:
        return AsyncStateService(AsyncRedisBackend.from_url(self.url, namespace=self.namespace))

    def test_a_store_that_cannot_list_keeps_conversations_across_a_restart(self) -> None:
        """Redis with a key_secret: a plain Application finds its conversations after a restart."""
        secret = register_secret("ptb-listing-key-secret-0123456789")

        def persistence() -> ChatstatePersistence:
            backend = AsyncRedisBackend.from_url(
                self.url, namespace=self.namespace, key_secret=secret
            )
            return ChatstatePersistence(AsyncStateService(backend), close_service=True)

        async def main() -> list[str]:
            texts = []
            for step in (["/start", "Ana"], ["33"]):
                app, sent = build_app(persistence())
                async with app:
                    for text in step:
                        await app.process_update(message(app, text))
                texts += sent.texts
            return texts

        assert asyncio.run(main()) == ["What is your name?", "How old are you?", "Ana is 33"]

    def test_erase_user_over_a_store_that_cannot_list_erases_nothing_and_says_why(self) -> None:
        """Not every conversation of the user can be found: a ConfigurationError, nothing gone."""
        secret = register_secret("ptb-listing-key-secret-0123456789")
        backend = AsyncRedisBackend.from_url(self.url, namespace=self.namespace, key_secret=secret)

        async def main() -> dict[str, Any]:
            ours = ChatstatePersistence(AsyncStateService(backend), close_service=True)
            await ours.update_user_data(ANA, {"name": "Ana"})
            with pytest.raises(ConfigurationError, match="nothing was erased"):
                await ours.erase_user(ANA)
            data = await ours.service.get(f"ptb:user:{ANA}")
            await ours.flush()
            return data

        assert asyncio.run(main()) == {"name": "Ana"}

    def test_a_store_that_cannot_list_loads_each_user_with_their_first_update(self) -> None:
        """Redis with a key_secret cannot list: start-up loads no one, the first update does."""
        secret = register_secret("ptb-listing-key-secret-0123456789")

        def service() -> AsyncStateService:
            backend = AsyncRedisBackend.from_url(
                self.url, namespace=self.namespace, key_secret=secret
            )
            return AsyncStateService(backend)

        async def main() -> tuple[dict[int, Any], dict[int, Any], list[str]]:
            writer = ChatstatePersistence(service(), close_service=True)
            await writer.update_user_data(ANA, {"visits": 4})
            await writer.flush()
            app, sent = build_app(
                ChatstatePersistence(service(), close_service=True),
                app_class=ChatstateApplication,
            )
            async with app:
                at_start = dict(app.user_data)
                await app.process_update(message(app, "/start"))
                return at_start, dict(app.user_data), sent.texts

        at_start, after, texts = asyncio.run(main())
        assert at_start == {}
        assert after == {ANA: {"visits": 5}}
        assert texts == ["What is your name?"]


def test_example_bot_runs_its_form_across_a_restart() -> None:
    """examples/ptb_bot.py's conversation continues on a new Application over the same store."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
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
        "Nice to meet you, Ana (33).",
    ]


def test_example_bot_is_configured_by_the_environment(redis_url: str, namespace: str) -> None:
    """examples/ptb_bot.py takes its token, Bot API server and Redis from the environment."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from ptb_bot import build_application

    env = {
        "TELEGRAM_TOKEN": TOKEN,
        "TELEGRAM_API_URL": "http://127.0.0.1:8081/",
        "REDIS_URL": redis_url,
        "CHATSTATE_NAMESPACE": namespace,
    }
    app = build_application(env)
    assert isinstance(app, ChatstateApplication)
    assert app.bot.base_url == f"http://127.0.0.1:8081/bot{TOKEN}"
    assert app.bot.base_file_url == f"http://127.0.0.1:8081/file/bot{TOKEN}"
    assert (
        build_application({"BOT_TOKEN": TOKEN, "REDIS_URL": redis_url}).bot.base_url
        == f"https://api.telegram.org/bot{TOKEN}"
    )

    async def main() -> dict[str, Any]:
        persistence = app.persistence
        assert isinstance(persistence, ChatstatePersistence)
        await persistence.update_bot_data({"seen": True})
        await persistence.flush()
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        stored = await svc.get("ptb:bot")
        await svc.aclose()
        return stored

    assert asyncio.run(main()) == {"seen": True}


def test_a_failed_update_is_handled_again_by_its_copy() -> None:
    """When a handler raises, the error handlers run and a copy of the update runs it again."""

    async def main() -> tuple[list[str], list[str], list[str]]:
        attempts: list[str] = []
        errors: list[str] = []

        async def flaky(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            attempts.append(update.message.text)
            if len(attempts) == 1:
                raise RuntimeError("boom")
            await update.message.reply_text("ok")

        async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
            errors.append(str(context.error))

        app, sent = build_app(
            ChatstatePersistence(AsyncStateService()), app_class=ChatstateApplication
        )
        app.add_handler(MessageHandler(filters.Regex("^flaky"), flaky), group=-1)
        app.add_error_handler(on_error)
        update = payload("flaky")
        async with app:
            for _ in range(3):
                await app.process_update(copy_for(app, update))
        return attempts, errors, sent.texts

    attempts, errors, texts = asyncio.run(main())
    assert attempts == ["flaky", "flaky"]
    assert errors == ["boom"]
    assert texts == ["ok"]


def test_a_failed_update_s_changes_are_never_stored_by_a_later_one() -> None:
    """A handler that changed user_data and chat_data, then raised, leaves neither changed.

    Kept in memory, its changes counted as this process's unwritten ones, and the
    user's next update stored them over the data another process had written since
    (found by a probe: the age form ended "Done boomX|33").
    """

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str]]:
        svc = AsyncStateService()

        async def boom(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            context.user_data["name"] = "boomX"
            context.chat_data["seen"] = "boomX"
            raise RuntimeError("boom")

        async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
            pass

        app, sent = build_app(ChatstatePersistence(svc), app_class=ChatstateApplication)
        app.add_handler(MessageHandler(filters.Regex("^boom"), boom), group=-1)
        app.add_error_handler(on_error)
        async with app:
            await app.process_update(message(app, "/set_a"))
            await app.process_update(message(app, "boom"))
            in_memory = dict(app.user_data[ANA])
            # Another process stores a newer name meanwhile.
            await svc.update(f"ptb:user:{ANA}", {"name": "Ana"})
            await app.process_update(message(app, "/set_b"))
        return (
            in_memory,
            await svc.get(f"ptb:user:{ANA}"),
            await svc.get(f"ptb:chat:{ANA}"),
            sent.texts,
        )

    in_memory, user, chat, texts = asyncio.run(main())
    assert in_memory == {"a": True}
    assert user == {"a": True, "b": True, "name": "Ana"}
    assert chat == {"a": True, "b": True}
    assert texts == ["a", "a,b,name"]


def test_an_update_whose_writes_fail_leaves_the_user_s_data_as_stored() -> None:
    """A write that fails (here a set, which JSON cannot hold) puts the user's data back.

    Left in memory, the update's changes were replayed by every later update of the
    user, which then failed the same way (or, after a store outage, stored them late
    over newer data: a probe's form ended "Done slowX|33|Rome" after the user said Y).
    """

    async def main() -> tuple[list[type[BaseException]], dict[str, Any], list[str]]:
        svc = AsyncStateService()
        app, sent = build_app(ChatstatePersistence(svc), app_class=ChatstateApplication)
        errors: list[type[BaseException]] = []

        async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
            errors.append(type(context.error))

        async def bad(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            context.user_data["ok"] = 1
            context.user_data["bad"] = {1, 2}

        app.add_error_handler(on_error)
        app.add_handler(CommandHandler("bad", bad), group=-1)
        async with app:
            await app.process_update(message(app, "/set_a"))
            await app.process_update(message(app, "/bad"))
            await app.process_update(message(app, "/set_b"))
        return errors, await svc.get(f"ptb:user:{ANA}"), sent.texts

    errors, stored, texts = asyncio.run(main())
    assert errors == [SerializationError]
    assert stored == {"a": True, "b": True}
    assert texts == ["a", "a,b"]


def _group_message(app: Application, text: str, user: int, chat: int = -100) -> Update:
    data = payload(text, user)
    data["message"]["chat"] = {"id": chat, "type": "group", "title": "G"}
    return Update.de_json(data, app.bot)


def test_a_failed_update_leaves_the_chat_data_of_another_running_update() -> None:
    """In a group, A's update fails while B's runs: B's change to chat_data is stored."""

    async def main() -> dict[str, Any]:
        svc = AsyncStateService()
        entered, go_on = asyncio.Event(), asyncio.Event()

        async def slow(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            context.chat_data["b"] = True
            entered.set()
            await go_on.wait()

        async def boom(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            raise RuntimeError("boom")

        async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
            pass

        app, _ = build_app(ChatstatePersistence(svc), app_class=ChatstateApplication)
        app.add_handler(MessageHandler(filters.Regex("^slow"), slow), group=-1)
        app.add_handler(MessageHandler(filters.Regex("^boom"), boom), group=-1)
        app.add_error_handler(on_error)
        async with app:
            running = asyncio.create_task(app.process_update(_group_message(app, "slow", BEA)))
            await entered.wait()
            await app.process_update(_group_message(app, "boom", ANA))
            go_on.set()
            await running
        return await svc.get("ptb:chat:-100")

    assert asyncio.run(main()) == {"b": True}


def test_a_failed_update_keeps_the_user_data_of_a_kind_not_stored() -> None:
    """With user_data not stored, a failed update does not wipe what the process holds."""

    async def main() -> dict[str, Any]:
        persistence = ChatstatePersistence(
            AsyncStateService(), store_data=PersistenceInput(user_data=False)
        )
        app, _ = build_app(persistence, app_class=ChatstateApplication)

        async def keep(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            context.user_data["cart"] = ["apples"]

        async def boom(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            raise RuntimeError("boom")

        async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
            pass

        app.add_handler(MessageHandler(filters.Regex("^keep"), keep), group=-1)
        app.add_handler(MessageHandler(filters.Regex("^boom"), boom), group=-1)
        app.add_error_handler(on_error)
        async with app:
            await app.process_update(message(app, "keep"))
            await app.process_update(message(app, "boom"))
            return dict(app.user_data[ANA])

    assert asyncio.run(main()) == {"cart": ["apples"]}


def test_a_failed_update_puts_its_conversation_state_back() -> None:
    """A conversation moved by one handler group, then a later group raised: not moved.

    Left moved and marked, python-telegram-bot's own run wrote it later, over what
    another process had stored meanwhile.
    """

    async def main() -> tuple[list[str], dict[str, Any]]:
        svc = AsyncStateService()

        async def boom(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            raise RuntimeError("boom")

        async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
            pass

        persistence = ChatstatePersistence(svc)
        app, sent = build_app(persistence, app_class=ChatstateApplication)
        app.add_handler(CommandHandler("start", boom), group=1)  # after the conversation
        app.add_error_handler(on_error)
        async with app:
            await app.process_update(message(app, "/start"))
            await app.process_update(message(app, "Ana"))  # no conversation to continue
            await app.update_persistence()
        return sent.texts, await svc.get(persistence.conversation_key_doc("form", (ANA, ANA)))

    texts, stored = asyncio.run(main())
    assert texts == ["What is your name?"]
    assert stored == {}


def test_one_process_runs_a_user_s_updates_in_the_order_they_came() -> None:
    """Updates of one user given at once (one getUpdates batch) run first in, first out.

    The claim alone let the waiting updates retry in any order: 17 of 20 users of a
    probe had their form filled out of order.
    """

    async def main() -> list[str]:
        app, sent = build_app(
            ChatstatePersistence(AsyncStateService()),
            app_class=ChatstateApplication,
        )
        order: list[str] = []

        async def note(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            order.append(update.message.text)
            await asyncio.sleep(0.001)  # the handler waits, as one that sends does

        app.add_handler(MessageHandler(filters.ALL, note), group=-1)
        updates = [message(app, text) for text in ["/start", "Ana", "33", *map(str, range(12))]]
        async with app:
            await asyncio.gather(*(app.process_update(u) for u in updates))
        assert sent.texts[:2] == ["What is your name?", "How old are you?"]
        assert sent.texts[2] == "Ana is 33"
        return order

    order = asyncio.run(main())
    assert order == ["/start", "Ana", "33", *map(str, range(12))]


def test_store_errors_reach_the_error_handlers() -> None:
    """A user busy past isolation_wait: LockTimeoutError to the error handlers, no raise.

    The update is not handled and not remembered, so a later copy is handled.
    """

    async def main() -> tuple[list[type[BaseException]], list[str], list[str]]:
        svc = AsyncStateService()
        app, sent = build_app(
            ChatstatePersistence(svc), app_class=ChatstateApplication, isolation_wait=0.05
        )
        errors: list[type[BaseException]] = []
        texts_while_busy: list[str] = []

        async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
            errors.append(type(context.error))

        app.add_error_handler(on_error)
        start = payload("/start")
        async with app:
            # Another process handling an update of the same user.
            async with await svc.claim(f"ptb:user:{ANA}", "update:elsewhere", purpose="telegram"):
                await app.process_update(copy_for(app, start))  # must not raise
                texts_while_busy += sent.texts
            await app.process_update(copy_for(app, start))
        return errors, texts_while_busy, sent.texts

    errors, while_busy, texts = asyncio.run(main())
    assert errors == [LockTimeoutError]
    assert while_busy == []
    assert texts == ["What is your name?"]


def test_application_options_are_checked() -> None:
    """Bad options are refused when the Application is built."""
    memory = ChatstatePersistence(AsyncStateService())
    with pytest.raises(ConfigurationError, match="dedupe_by"):
        build_app(memory, app_class=ChatstateApplication, dedupe_by="chat_id")
    for option in ("lease", "dedupe_wait", "isolation_wait"):
        with pytest.raises(ConfigurationError, match="positive"):
            build_app(memory, app_class=ChatstateApplication, **{option: 0})
    app, _ = build_app(memory, app_class=ChatstateApplication, isolate=False)
    assert app.isolate is False


def test_dedupe_keys_are_the_aiogram_integrations() -> None:
    """dedupe_key gives each update the key the aiogram integration gives it."""
    from aiogram.types import Update as AiogramUpdate

    from chatstate.integrations import aiogram as aiogram_integration

    chat = {"id": -100, "type": "supergroup", "title": "G"}
    updates = [
        {"update_id": 1, "message": {"message_id": 5, "date": 1700000000, "chat": chat}},
        {
            "update_id": 2,
            "edited_message": {
                "message_id": 5,
                "date": 1700000000,
                "edit_date": 1700000100,
                "chat": chat,
            },
        },
        {
            "update_id": 3,
            "business_message": {
                "message_id": 6,
                "date": 1700000000,
                "chat": chat,
                "business_connection_id": "b:1/2",
            },
        },
        {
            "update_id": 4,
            "callback_query": {
                "id": "q1",
                "from": {"id": 7, "is_bot": False, "first_name": "A"},
                "chat_instance": "c",
            },
        },
        {
            "update_id": 5,
            "inline_query": {
                "id": "i1",
                "from": {"id": 7, "is_bot": False, "first_name": "A"},
                "query": "",
                "offset": "",
            },
        },
        {"update_id": 6},  # a kind neither tells apart: the update id
    ]
    for data in updates:
        ours = Update.de_json(copy.deepcopy(data), None)
        theirs = AiogramUpdate.model_validate(copy.deepcopy(data))
        for by in ("update_id", "message_id"):
            assert dedupe_key(ours, by) == aiogram_integration.dedupe_key(theirs, by), (data, by)
    assert dedupe_key(Update.de_json(updates[1], None), "message_id") == (
        "edited_message:-100:5:e1700000100"
    )


def test_a_tuple_written_is_not_replayed_over_a_newer_value() -> None:
    """Data written with a tuple and an enum member, then changed elsewhere: a refresh takes it.

    The tuple is stored as a list, so it is not a change of this process's own
    to apply again over the other writer's value.
    """

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        svc = AsyncStateService()
        ours = ChatstatePersistence(svc)
        data: dict[str, Any] = {"pair": (1, 2), "level": Level.AGE}
        await ours.update_user_data(ANA, data)
        await svc.assign(f"ptb:user:{ANA}", {"pair": [3, 4], "level": 0})  # another process
        await ours.refresh_user_data(ANA, data)  # data still holds the tuple and the member
        await ours.update_user_data(ANA, data)
        return data, await svc.get(f"ptb:user:{ANA}")

    assert asyncio.run(main()) == ({"pair": [3, 4], "level": 0}, {"pair": [3, 4], "level": 0})


def test_callback_data_with_tuples_and_enums_is_stored_as_json() -> None:
    """Arbitrary callback data (tuples, enum members) is kept as JSON lists and values."""

    async def main() -> CDCData | None:
        svc = AsyncStateService()
        cache = ([("uuid-1", 1700000000.5, {"btn": (Level.AGE, "x")})], {"q": "uuid-1"})
        await ChatstatePersistence(svc).update_callback_data(cache)
        return await ChatstatePersistence(svc).get_callback_data()

    assert asyncio.run(main()) == ([("uuid-1", 1700000000.5, {"btn": [1, "x"]})], {"q": "uuid-1"})


def test_register_states_brings_back_the_handlers_own_states() -> None:
    """A stored state equal as JSON to a registered one comes back as that object."""

    async def main() -> dict[Any, object]:
        svc = AsyncStateService()
        writer = ChatstatePersistence(svc)
        await writer.update_conversation("form", (1, 1), Ask.AGE)
        await writer.update_conversation("form", (2, 2), Level.AGE)
        await writer.update_conversation("form", (3, 3), "unknown")
        reader = ChatstatePersistence(svc)
        reader.register_states("form", [Ask.NAME, Ask.AGE, {1, 2}])  # a set: never stored
        return dict(await reader.get_conversations("form"))

    states = asyncio.run(main())
    assert states == {(1, 1): Ask.AGE, (2, 2): 1, (3, 3): "unknown"}
    assert states[(1, 1)] is Ask.AGE


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

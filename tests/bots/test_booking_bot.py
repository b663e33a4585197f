"""The booking example bot: registration, booking with a photo step, two languages, reminders."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import pytest

from chatstate import RedisBackend, StateService
from chatstate.flow import Media, Message, render_text
from chatstate.testing import Conversation
from fakes import FakeClock

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from booking_bot import RULES, Clinic, build_router

TODAY = dt.date(2030, 1, 10)


def _bot(service: StateService | None = None) -> tuple[Any, FakeClock, Clinic]:
    clock = FakeClock()
    clinic = Clinic(today=TODAY)
    router = build_router(service or StateService(rules=RULES), clinic, clock=clock)
    return router, clock, clinic


def _register(chat: Conversation, language: str = "en", name: str = "Ana Gómez") -> list[str]:
    chat.send("hi")
    chat.send("register")
    chat.send(reply_id=language)
    return chat.send(name)


def _book(chat: Conversation, day: str = "2030-01-12", time: str = "10:00") -> list[str]:
    chat.send("book")
    chat.send(reply_id="checkup")
    chat.send(day)
    chat.send(reply_id=time)
    chat.send("skip")
    return chat.send(reply_id="yes")


def test_register_and_book_in_english() -> None:
    """A guest registers, books a check-up, and lists it."""
    router, _, clinic = _bot()
    chat = Conversation(router, "34611111111")
    assert chat.send("hi") == ["Welcome to Smile Clinic.\n[Register]"]
    assert chat.send("book") == ["Please register first.", "Welcome to Smile Clinic.\n[Register]"]
    assert _register(chat) == ["Welcome, Ana Gómez! Say hi to book an appointment."]
    assert chat.send("register") == chat.send("hi")  # guest only: the main menu instead
    assert chat.send("book")[0].startswith("Which service?")
    assert chat.send(reply_id="checkup") == ["Which day? (YYYY-MM-DD)"]
    assert chat.send("tomorrow") == [
        "Please send a date like 2030-01-31.",
        "Which day? (YYYY-MM-DD)",
    ]
    assert chat.send("2030-01-01")[0] == "That day is in the past."
    assert chat.send("2030-01-12")[0].startswith("Free times on 2030-01-12:")
    assert chat.send(reply_id="10:00") == ["Send a photo of your insurance card, or type skip."]
    card = Message(chat.user_id, media=Media("card-1", "image/jpeg"), message_id="photo-1")
    assert [render_text(s) for s in router.handle(card)] == [
        "Check-up on 2030-01-12 at 10:00. Confirm?\n[Confirm]\n[Change day]"
    ]
    assert chat.state["flow"]["data"]["card"] == {"id": "card-1", "mime_type": "image/jpeg"}
    assert chat.send(reply_id="yes", message_id="confirm-1") == [
        "Booked: Check-up on 2030-01-12 at 10:00."
    ]
    assert chat.send(reply_id="yes", message_id="confirm-1") == []  # a redelivery
    assert clinic.calls == 1
    assert chat.send("my appointments") == ["Your appointments:\n- Check-up: 2030-01-12 10:00"]


def test_register_and_book_in_spanish() -> None:
    """Choosing Español translates menus, prompts, chatstate's own texts and the bot's."""
    router, _, _ = _bot()
    chat = Conversation(router, "34622222222")
    assert _register(chat, "es", "Luis") == ["¡Bienvenido, Luis! Di hola para pedir cita."]
    assert chat.state["language"] == "es"
    assert chat.send("hi") == ["¿Qué quieres hacer?\n[Pedir cita]\n[Mis citas]\n[Idioma]"]
    assert chat.send("mis citas") == ["No tienes citas."]  # a translated title, typed
    chat.send("pedir cita")
    assert chat.send("x") == [
        "Responde una de: checkup, cleaning, whitening.",
        chat.texts[1],
    ]
    chat.send(reply_id="cleaning")
    chat.send("2030-01-12")
    chat.send(reply_id="09:00")
    sticker = Message(chat.user_id, media=Media("s", "image/webp"), kind="sticker")
    assert [render_text(s) for s in router.handle(sticker)] == [
        "Envía una foto / texto.",
        "Envía una foto de tu tarjeta del seguro, o escribe skip.",
    ]
    chat.send("skip")
    assert chat.send(reply_id="yes") == ["Reservado: Limpieza el 2030-01-12 a las 09:00."]
    assert chat.send("idioma") == ["What would you like to do?"]  # switched back to English
    assert chat.state["language"] == "en"


def test_a_taken_slot_starts_the_booking_again() -> None:
    """When the clinic refuses the time, the hook starts the flow over in the same write."""
    router, _, clinic = _bot()
    ana, bob = Conversation(router, "34611111111"), Conversation(router, "34633333333")
    _register(ana)
    _register(bob)
    for chat in (ana, bob):
        chat.send("book")
        chat.send(reply_id="checkup")
        chat.send("2030-01-12")
        chat.send(reply_id="11:00")
        chat.send("skip")
    assert ana.send(reply_id="yes") == ["Booked: Check-up on 2030-01-12 at 11:00."]
    replies = bob.send(reply_id="yes")
    assert replies[0] == "Sorry, 11:00 was just taken. Pick another time."
    assert replies[1].startswith("Which service?")
    assert bob.state["flow"]["step"] == "service"
    assert clinic.booked == {("2030-01-12", "11:00"): "34611111111"}


def _due(router: Any) -> list[tuple[str, list[str]]]:
    return [(user, [render_text(s) for s in replies]) for user, replies in router.due()]


def _reminders(service: StateService) -> None:
    router, clock, _ = _bot(service)
    chat = Conversation(router, "34644444444")
    _register(chat, "es", "Eva")
    chat.send("pedir cita")
    chat.send(reply_id="checkup")
    assert _due(router) == []
    clock.now += 11 * 60
    assert _due(router) == [("34644444444", ["¿Sigues ahí?", "¿Qué día? (AAAA-MM-DD)"])]
    assert _due(router) == []  # once
    other = build_router(service, Clinic(today=TODAY), clock=clock)  # another process
    assert _due(other) == []
    clock.now += 60 * 60
    fired = _due(other) + _due(router)
    assert fired == [
        ("34644444444", ["La conversación caducó; empecemos de nuevo.", chat.send("hi")[0]])
    ]
    assert "flow" not in chat.state


def test_reminders_and_timeouts_fire_once_on_memory() -> None:
    """A reminder after ten idle minutes, a timeout after an hour, in the user's language."""
    _reminders(StateService(rules=RULES))


@pytest.mark.redis
def test_reminders_and_timeouts_fire_once_on_redis(redis_url: str, namespace: str) -> None:
    """The same on Redis, where the deadlines live in the store's index."""
    service = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    try:
        _reminders(service)
    finally:
        service.close()


def _appointment_reminder(service: StateService, year: int = 2030) -> None:
    clock = FakeClock(dt.datetime(year, 1, 10, 8, 0, tzinfo=dt.UTC).timestamp())
    router = build_router(service, Clinic(today=dt.date(year, 1, 10)), clock=clock)
    chat = Conversation(router, "34655555555")
    _register(chat, "es", "Eva")
    assert _book(chat, f"{year}-01-12", "10:00") == [
        f"Reservado: Revisión el {year}-01-12 a las 10:00."
    ]
    assert router.scheduled("34655555555") == {
        f"appointment-{year}-01-12-10:00": dt.datetime(
            year, 1, 11, 10, 0, tzinfo=dt.UTC
        ).timestamp()
    }
    clock.now = dt.datetime(year, 1, 11, 9, 59, tzinfo=dt.UTC).timestamp()
    assert _due(router) == []
    clock.now += 60
    restarted = build_router(service, Clinic(today=dt.date(year, 1, 10)), clock=clock)
    assert _due(restarted) == [  # it survives a restart
        ("34655555555", [f"Recordatorio: Revisión mañana, {year}-01-12, a las 10:00."])
    ]
    assert _due(router) == _due(restarted) == []  # once
    assert router.scheduled("34655555555") == {}


def test_each_appointment_is_reminded_24_hours_before_on_memory() -> None:
    """Booking schedules a reminder 24 h before the appointment, in the user's language."""
    _appointment_reminder(StateService(rules=RULES))


def test_the_reminder_follows_the_router_s_clock_not_the_machine_s() -> None:
    """Under a clock set in 2020 the reminder is still scheduled (it compared with time.time())."""
    _appointment_reminder(StateService(rules=RULES), year=2020)


@pytest.mark.redis
def test_each_appointment_is_reminded_24_hours_before_on_redis(
    redis_url: str, namespace: str
) -> None:
    """The same on Redis: the reminder is in the document, its time in the index."""
    service = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    try:
        _appointment_reminder(service)
    finally:
        service.close()

"""An appointment-booking bot in two languages, with reminders.

A guest registers (language, name); a registered user books an appointment
(service from a list, day, a free time from the clinic's calendar, an optional
photo of the insurance card, confirmation), lists their appointments, or
switches language. A booking left idle gets one reminder after ten minutes
and ends after an hour, and every appointment gets a reminder 24 hours before
it (a scheduled message, stored with the booking in the same write), all
delivered by ``router.due()`` (or ``run_due``) without waiting for the user.
The clinic is a fake in-process API that books once per idempotency key; its
times are in ``CLINIC_TZ``.

``build_router(service, clinic)`` wires it over any :class:`~chatstate.StateService`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from chatstate import StateData, StateService
from chatstate.flow import (
    DONE,
    Button,
    Buttons,
    Context,
    Flow,
    Invalid,
    ListScreen,
    Menu,
    MenuItem,
    Router,
    Row,
    Section,
    Step,
)

RULES = StateData(preserved=["profile", "language"])
SERVICES = {"checkup": "Check-up", "cleaning": "Cleaning", "whitening": "Whitening"}
HOURS = ("09:00", "10:00", "11:00", "12:00", "16:00", "17:00")
CLINIC_TZ = dt.UTC
REMIND_BEFORE = timedelta(hours=24)

SPANISH = {
    # menus
    "Welcome to Smile Clinic.": "Bienvenido a Clínica Sonrisa.",
    "Register": "Registrarme",
    "What would you like to do?": "¿Qué quieres hacer?",
    "Book": "Pedir cita",
    "My appointments": "Mis citas",
    "Language": "Idioma",
    # registration
    "Which language do you prefer?": "¿Qué idioma prefieres?",
    "Your full name, please.": "Tu nombre completo, por favor.",
    "Welcome, {name}! Say hi to book an appointment.": (
        "¡Bienvenido, {name}! Di hola para pedir cita."
    ),
    "Please send at least two letters.": "Envía al menos dos letras.",
    # booking
    "Which service?": "¿Qué servicio?",
    "Services": "Servicios",
    "Check-up": "Revisión",
    "Cleaning": "Limpieza",
    "Whitening": "Blanqueamiento",
    "Which day? (YYYY-MM-DD)": "¿Qué día? (AAAA-MM-DD)",
    "Please send a date like 2030-01-31.": "Envía una fecha como 2030-01-31.",
    "That day is in the past.": "Ese día ya pasó.",
    "No free times that day; pick another.": "No quedan horas ese día; elige otro.",
    "Free times on {day}:": "Horas libres el {day}:",
    "Times": "Horas",
    "That time is not free.": "Esa hora no está libre.",
    "Send a photo of your insurance card, or type skip.": (
        "Envía una foto de tu tarjeta del seguro, o escribe skip."
    ),
    "{service} on {day} at {time}. Confirm?": "{service} el {day} a las {time}. ¿Confirmas?",
    "Confirm": "Confirmar",
    "Change day": "Cambiar día",
    "Booked: {service} on {day} at {time}.": "Reservado: {service} el {day} a las {time}.",
    "Sorry, {time} was just taken. Pick another time.": (
        "Lo siento, las {time} se acaban de ocupar. Elige otra hora."
    ),
    "Reminder: {service} tomorrow, {day}, at {time}.": (
        "Recordatorio: {service} mañana, {day}, a las {time}."
    ),
    "You have no appointments.": "No tienes citas.",
    "Your appointments:": "Tus citas:",
    # built-in texts of chatstate
    "Cancelled.": "Cancelado.",
    "Please answer one of: {choices}.": "Responde una de: {choices}.",
    "Please register first.": "Primero regístrate.",
    "Please send {kinds}.": "Envía {kinds}.",
    "a photo": "una foto",
    "text": "texto",
    "Are you still there?": "¿Sigues ahí?",
    "That conversation timed out; let's start again.": (
        "La conversación caducó; empecemos de nuevo."
    ),
    "Sorry, that is not a valid answer.": "Lo siento, esa respuesta no vale.",
}


class SlotTakenError(Exception):
    """The time was booked by someone else meanwhile."""


@dataclass
class Clinic:
    """A fake clinic API: a calendar of free times, bookings made once per idempotency key."""

    today: dt.date = field(default_factory=dt.date.today)
    booked: dict[tuple[str, str], str] = field(default_factory=dict)  # (day, time) -> user
    by_key: dict[str, dict[str, str]] = field(default_factory=dict)
    calls: int = 0

    def free_times(self, day: str) -> list[str]:
        return [t for t in HOURS if (day, t) not in self.booked]

    def book(self, user: str, service: str, day: str, time: str, *, key: str) -> dict[str, str]:
        """Book once per ``key``: a repeated key returns the first booking."""
        self.calls += 1
        if key in self.by_key:
            return self.by_key[key]
        if (day, time) in self.booked:
            raise SlotTakenError(time)
        self.booked[(day, time)] = user
        booking = {"service": service, "day": day, "time": time}
        self.by_key[key] = booking
        return booking


Ctx = Context[Clinic]


# -- registration ----------------------------------------------------------------------


LANGUAGES = {"en": "en", "english": "en", "es": "es", "español": "es", "espanol": "es"}


def _pick_language(answer: str, ctx: Ctx) -> str:
    code = LANGUAGES.get(answer.casefold())
    if code is None:
        raise Invalid("Please answer one of: English, Español.")
    ctx.set_language(code)  # stored with the flow's end; this message's replies use it now
    return code


def _full_name(answer: str) -> str:
    name = " ".join(answer.split())
    if len(name) < 2:
        raise Invalid("Please send at least two letters.")
    return name


class Register(Flow):
    """A guest picks a language and gives a name."""

    language = Step(
        Buttons(
            "Which language do you prefer?", [Button("en", "English"), Button("es", "Español")]
        ),
        clean=_pick_language,
        next={"en": "full_name", "es": "full_name"},
    )
    full_name = Step("Your full name, please.", clean=_full_name)

    def on_complete(self, data: dict[str, Any], ctx: Ctx) -> str:
        ctx.set_preserved("profile", {"name": data["full_name"]})
        return ctx.t("Welcome, {name}! Say hi to book an appointment.", name=data["full_name"])


# -- booking ------------------------------------------------------------------------------


def _services(_data: dict[str, Any], ctx: Ctx) -> ListScreen:
    rows = [Row(key, ctx.t(title)) for key, title in SERVICES.items()]
    return ListScreen(ctx.t("Which service?"), ctx.t("Services"), [Section(rows)])


def _day(answer: str, ctx: Ctx) -> str:
    try:
        day = dt.date.fromisoformat(answer.strip())
    except ValueError:
        raise Invalid(ctx.t("Please send a date like 2030-01-31.")) from None
    if day < ctx.deps.today:
        raise Invalid(ctx.t("That day is in the past."))
    if not ctx.deps.free_times(day.isoformat()):
        raise Invalid(ctx.t("No free times that day; pick another."))
    return day.isoformat()


def _times(data: dict[str, Any], ctx: Ctx) -> ListScreen:
    rows = [Row(t, t) for t in ctx.deps.free_times(data["day"])]
    return ListScreen(
        ctx.t("Free times on {day}:", day=data["day"]), ctx.t("Times"), [Section(rows)]
    )


def _time(answer: str, ctx: Ctx) -> str:
    if answer not in ctx.deps.free_times(ctx.data["day"]):
        raise Invalid(ctx.t("That time is not free."))
    return answer


def _card(answer: Any, ctx: Ctx) -> dict[str, Any]:
    """A photo's media object, or ``skip``."""
    if isinstance(answer, str):
        if answer.casefold() != "skip":
            raise Invalid(ctx.t("Send a photo of your insurance card, or type skip."))
        return {"skipped": True}
    return answer.to_json()  # type: ignore[no-any-return]


def _confirm(data: dict[str, Any], ctx: Ctx) -> Buttons:
    text = ctx.t(
        "{service} on {day} at {time}. Confirm?",
        service=ctx.t(SERVICES[data["service"]]),
        day=data["day"],
        time=data["time"],
    )
    return Buttons(text, [Button("yes", ctx.t("Confirm")), Button("no", ctx.t("Change day"))])


class Book(Flow):
    """Book an appointment: service, day, time, insurance card, confirmation."""

    requires_auth = True
    reminder = timedelta(minutes=10)
    timeout = timedelta(hours=1)

    service = Step(_services, next=dict.fromkeys(SERVICES, "day"))
    day = Step("Which day? (YYYY-MM-DD)", clean=_day, next="time")
    time = Step(_times, clean=_time, next="card")
    card = Step(
        "Send a photo of your insurance card, or type skip.",
        accepts=["image", "text"],
        clean=_card,
        next="confirm",
    )
    confirm = Step(_confirm, next={"yes": DONE, "no": "day"})

    def on_complete(self, data: dict[str, Any], ctx: Ctx) -> str:
        try:
            booking = ctx.deps.book(
                ctx.user_id, data["service"], data["day"], data["time"], key=ctx.idempotency_key
            )
        except SlotTakenError:
            ctx.start(Book)  # start over, in the same write
            return ctx.t("Sorry, {time} was just taken. Pick another time.", time=data["time"])
        appointments = list(ctx.state.get("appointments") or [])
        ctx.update({"appointments": [*appointments, booking]})
        _remind(booking, ctx)
        return ctx.t(
            "Booked: {service} on {day} at {time}.",
            service=ctx.t(SERVICES[booking["service"]]),
            day=booking["day"],
            time=booking["time"],
        )


def _remind(booking: dict[str, str], ctx: Ctx) -> None:
    """Schedule a reminder 24 h before the appointment (none if that is past already)."""
    starts = dt.datetime.fromisoformat(f"{booking['day']}T{booking['time']}")
    remind_at = starts.replace(tzinfo=CLINIC_TZ) - REMIND_BEFORE
    if remind_at.timestamp() <= ctx.now:
        return
    text = ctx.t(
        "Reminder: {service} tomorrow, {day}, at {time}.",
        service=ctx.t(SERVICES[booking["service"]]),
        day=booking["day"],
        time=booking["time"],
    )
    ctx.schedule(f"appointment-{booking['day']}-{booking['time']}", remind_at, text)


# -- handlers and the router ------------------------------------------------------------------


def _appointments(ctx: Ctx) -> str:
    booked = ctx.state.get("appointments") or []
    if not booked:
        return ctx.t("You have no appointments.")
    lines = [ctx.t("Your appointments:")]
    lines += [f"- {ctx.t(SERVICES[b['service']])}: {b['day']} {b['time']}" for b in booked]
    return "\n".join(lines)


def _switch_language(ctx: Ctx) -> Any:
    ctx.set_language("en" if ctx.language == "es" else "es")
    return ctx.t("What would you like to do?")


def build_router(
    service: StateService, clinic: Clinic | None = None, **options: Any
) -> Router[Clinic]:
    """The bot over ``service`` (whose rules must preserve ``profile`` and ``language``)."""
    guest = Menu(
        "Welcome to Smile Clinic.",
        [MenuItem("register", "Register", flow=Register, guest_only=True)],
    )
    main = Menu(
        "What would you like to do?",
        [
            MenuItem("book", "Book", flow=Book),
            MenuItem("appointments", "My appointments", handler=_appointments, requires_auth=True),
            MenuItem("language", "Language", handler=_switch_language),
        ],
    )
    return Router(
        service,
        main_menu=main,
        auth_menu=guest,
        deps=clinic if clinic is not None else Clinic(),
        is_authenticated=lambda doc: bool(doc.get("profile")),
        translations={"es": SPANISH},
        login_first_text="Please register first.",
        **options,
    )


__all__ = [
    "CLINIC_TZ",
    "REMIND_BEFORE",
    "RULES",
    "SPANISH",
    "Book",
    "Clinic",
    "Register",
    "build_router",
]

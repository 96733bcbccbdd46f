"""The settings form: default model, KV cache for new chats, sampling, theme."""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from mlx_cache.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, CacheConfig, CacheConfigError
from mlx_cache.presets import PRESETS, preset_of
from models.sample import SamplingConfig

from ...settings import Settings, window_below_sinks

_FP = "float"  # the Select value meaning "not quantized" (the model's own float type)
_BY_HAND = "by hand"  # the preset Select value meaning "the fields below as they are"


def _preset_of(c: CacheConfig) -> str:
    return preset_of(c) or _BY_HAND


def _input(value: str, **kwargs: Any) -> Input:
    return Input(value, compact=True, **kwargs)


def _select(options: list[tuple[str, str]], **kwargs: Any) -> Select[str]:
    return Select(options, compact=True, allow_blank=False, **kwargs)


def _row(label: str, widget: Widget, hint: str = "", hint_id: str | None = None) -> Horizontal:
    return Horizontal(
        Label(label, classes="form-label"),
        widget,
        Label(hint, classes="form-hint", id=hint_id),
        classes="form-row",
    )


_PRESET_HINT = "loss (KL vs full) on SmolLM2 at 4K"


def _preset_hint(name: str) -> str:
    return PRESETS[name].note if name in PRESETS else _PRESET_HINT


class SettingsScreen(ModalScreen[Settings | None]):
    """Edit and validate settings; dismisses with the new Settings or None."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, settings: Settings, themes: list[str]) -> None:
        super().__init__(classes="dialog-screen")
        self.settings = settings
        self.themes = themes
        self._original_theme = settings.theme

    def compose(self) -> ComposeResult:
        s = self.settings
        c, p = s.cache, s.sampling
        bits = [("float (not quantized)", _FP)] + [(f"{b}-bit", str(b)) for b in SUPPORTED_BITS]
        with Vertical(classes="dialog -settings"):
            yield Label("Settings", classes="dialog-title")
            with VerticalScroll(id="settings-form"):
                yield Label("Model", classes="form-section")
                yield _row("Default model", _input(s.model or "", placeholder="embedded SmolLM2-135M-Instruct", id="model"),
                           "path, .gguf or repo id")
                yield Label("KV cache (new chats)", classes="form-section")
                yield _row("Kind", _select([("full", "full"), ("rotating window", "rotating")], value=c.kind,
                                          id="kind"))
                yield _row("Window", _input(str(c.window), type="integer", id="window"), "rotating: recent tokens kept")
                yield _row("Sinks", _input(str(c.sinks), type="integer", id="sinks"), "rotating: first tokens kept")
                presets = [("by hand (the fields below)", _BY_HAND)] + [
                    (f"{n}: {p.bits:.2f} bits, KL {p.kl:.3f}", n) for n, p in PRESETS.items()]
                yield _row("Preset", _select(presets, value=_preset_of(c), id="preset"), _preset_hint(_preset_of(c)),
                           hint_id="preset-hint")
                yield _row("Key bits", _select(bits, value=str(c.k_bits) if c.k_bits else _FP, id="k_bits"))
                yield _row("Value bits", _select(bits, value=str(c.v_bits) if c.v_bits else _FP, id="v_bits"))
                yield _row("Group size", _select([(str(g), str(g)) for g in SUPPORTED_GROUP_SIZES], value=str(c.group_size),
                                                id="group_size"), "quantization group")
                yield _row("Hadamard rotate", Checkbox("rotate", c.rotate, id="rotate", compact=True), "quantized only: keeps low bits accurate")
                yield _row("Float sinks", _input(str(c.keep_fp), type="integer", id="keep_fp"), "first tokens never quantized")
                yield _row("Float window", _input(str(c.fp_window), type="integer", id="fp_window"),
                           "last tokens not yet quantized")
                yield _row("Per-channel keys", Checkbox("per channel", c.k_per_channel, id="k_per_channel", compact=True),
                           "full cache only (KIVI)")
                yield _row("KV budget", _input(s.kv_budget or "", placeholder="what the device can spare",
                                               id="kv_budget"), "such as 2GB")
                yield _row("Over budget", _select([("switch to a window", "rotate"), ("refuse the turn", "refuse")],
                                                  value=s.on_budget, id="on_budget"))
                yield Label("Sampling", classes="form-section")
                yield _row("Temperature", _input(str(p.temperature), type="number", id="temperature"), "0 = greedy")
                yield _row("Top-p", _input(str(p.top_p), type="number", id="top_p"), "1 = off")
                yield _row("Min-p", _input(str(p.min_p), type="number", id="min_p"), "0 = off")
                yield _row("Repetition penalty", _input(str(p.repetition_penalty), type="number", id="repetition_penalty"),
                           "1 = off")
                yield _row("Max tokens", _input(str(p.max_tokens), type="integer", id="max_tokens"), "per answer")
                yield _row("Seed", _input("" if p.seed is None else str(p.seed), type="integer", placeholder="random",
                                         id="seed"), "fixed seed repeats answers")
                yield Label("Look", classes="form-section")
                themes = sorted(self.themes)
                value = s.theme if s.theme in themes else (themes[0] if themes else s.theme)
                yield _row("Theme", _select([(t, t) for t in themes], value=value, id="theme"),
                           "previews live")
            yield Static("", id="error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Save", id="save", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#model", Input).focus()

    @on(Select.Changed, "#preset")
    def _preset_chosen(self, event: Select.Changed) -> None:
        self.query_one("#preset-hint", Label).update(_preset_hint(str(event.value)))
        if event.value == _BY_HAND or event.value not in PRESETS:
            return
        p = PRESETS[str(event.value)].config
        for wid in ("k_bits", "v_bits"):
            self.query_one(f"#{wid}", Select).value = str(getattr(p, wid)) if getattr(p, wid) else _FP
        self.query_one("#group_size", Select).value = str(p.group_size)
        self.query_one("#rotate", Checkbox).value = p.rotate
        self.query_one("#k_per_channel", Checkbox).value = p.k_per_channel
        for wid in ("keep_fp", "fp_window"):
            self.query_one(f"#{wid}", Input).value = str(getattr(p, wid))

    def _value(self, wid: str) -> Any:
        return self.query_one(f"#{wid}").value  # type: ignore[attr-defined]

    def build(self) -> Settings:
        """Settings from the form; raises ValueError with a sentence naming the field."""

        def num(wid: str, kind: type, label: str) -> Any:
            text = str(self._value(wid)).strip()
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{label} must be a number.") from None

        def bits(wid: str) -> int | None:
            v = self._value(wid)
            return None if v == _FP else int(v)

        try:
            cache = CacheConfig(
                kind=self._value("kind"),
                window=num("window", int, "Window"),
                sinks=num("sinks", int, "Sinks"),
                k_bits=bits("k_bits"),
                v_bits=bits("v_bits"),
                group_size=int(self._value("group_size")),
                rotate=bool(self.query_one("#rotate", Checkbox).value),
                keep_fp=num("keep_fp", int, "Float sinks"),
                fp_window=num("fp_window", int, "Float window"),
                k_per_channel=bool(self.query_one("#k_per_channel", Checkbox).value),
            )
        except CacheConfigError as e:
            raise ValueError(str(e)) from None
        problem = window_below_sinks(cache)
        if problem:
            raise ValueError(f"{problem}: make Window at least {cache.sinks}, or Sinks at most {cache.window}.")
        seed_text = str(self._value("seed")).strip()
        sampling = self.settings.sampling.with_(
            temperature=num("temperature", float, "Temperature"),
            top_p=num("top_p", float, "Top-p"),
            min_p=num("min_p", float, "Min-p"),
            repetition_penalty=num("repetition_penalty", float, "Repetition penalty"),
            max_tokens=num("max_tokens", int, "Max tokens"),
            seed=int(seed_text) if seed_text else None,
        )
        assert isinstance(sampling, SamplingConfig)
        model = str(self._value("model")).strip() or None
        budget = str(self._value("kv_budget")).strip() or None
        if budget is not None:
            from mlx_cache.memory import parse_size

            if parse_size(budget) <= 0:  # ValueError: "'lots' is not a size: write it like 2GB ..."
                raise ValueError("The KV budget must be above 0, such as 2GB: leave it empty for what the device can spare.")
        return self.settings.with_(model=model, cache=cache, sampling=sampling, theme=self._value("theme"),
                                   kv_budget=budget, on_budget=self._value("on_budget"))

    @on(Select.Changed, "#theme")
    def _preview_theme(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value in self.app.available_themes:
            self.app.theme = event.value

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        try:
            settings = self.build()
        except ValueError as e:
            self.query_one("#error", Static).update(str(e))
            return
        self.dismiss(settings)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.app.theme = self._original_theme if self._original_theme in self.app.available_themes else self.app.theme
        self.dismiss(None)

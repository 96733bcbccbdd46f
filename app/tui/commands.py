"""Command palette entries for every chat action, built from the screen's bindings.

The bindings are the one list of actions: each has a description (its name in
the footer) and a tooltip (its help here), so the palette and the footer can
never disagree. An action the screen would grey out (`check_action`) is not
listed: Stop only while an answer runs, Regenerate only after a message.
"""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider


class ChatCommands(Provider):
    """Every action of the chat screen that can run now, with its key."""

    def commands(self) -> list[tuple[str, str, str]]:
        """(title with its key, help, action) of each chat action that can run now."""
        from .screens.chat import ChatScreen

        screen = next((s for s in self.app.screen_stack if isinstance(s, ChatScreen)), None)
        if screen is None:
            return []
        rows = []
        for binding in ChatScreen.BINDINGS:
            assert not isinstance(binding, tuple)
            if not screen.check_action(binding.action, ()):
                continue  # greyed out or hidden in the footer: nothing it could do now (Stop with no answer)
            key = self.app.get_key_display(binding)
            title = {
                "New": "New chat",
                "Sessions": "Open a saved chat…",
                "Regenerate": "Regenerate the last answer",
                "Edit": "Edit and resend the last message…",
                "System": "Set the system prompt…",
                "Rename": "Rename this chat…",
                "Fork": "Fork this chat…",
                "Delete": "Delete this chat…",
                "Model": "Choose a model…",
                "Settings": "Settings…",
                "Meter": "Toggle the memory meter",
                "Stop": "Stop the answer",
            }.get(binding.description, binding.description)
            rows.append((f"{title}  ({key})", binding.tooltip, binding.action))
        return rows

    async def _run(self, action: str) -> None:
        from .screens.chat import ChatScreen

        screen = next((s for s in self.app.screen_stack if isinstance(s, ChatScreen)), None)
        if screen is not None:
            await screen.run_action(action)

    async def discover(self) -> Hits:
        for title, help_text, action in self.commands():
            yield DiscoveryHit(title, partial(self._run, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, action in self.commands():
            score = max(matcher.match(title), matcher.match(help_text) * 0.8)
            if score > 0:
                yield Hit(score, matcher.highlight(title), partial(self._run, action), help=help_text)

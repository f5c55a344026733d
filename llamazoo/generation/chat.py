"""Interactive chat: history through the tokenizer's chat template, streamed answers, a few slash commands.

Each turn re-renders the whole conversation and prefills it (no KV reuse across turns: simple and exact).
When the conversation no longer fits in max_seq_length - max_new_tokens, the oldest turns are dropped
(the system message stays). Ctrl-C during an answer ends that answer; what was said stays in history.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, TextIO

from llamazoo.generation.engine import Engine, RowResult
from llamazoo.generation.sampling import SamplingParams

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit"


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation through the tokenizer's chat template, the assistant's turn opened, -> token ids
    (the template writes its special tokens itself). `generate`, `chat` and `serve` all encode this way."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


@dataclass
class ChatSession:
    engine: Engine
    params: SamplingParams
    max_new_tokens: int
    eos_ids: Sequence[int]
    stop: Sequence[str] = ()
    system: str | None = None
    seed: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        import torch

        self.generator = torch.Generator(device=self.engine.device)
        if self.seed is not None:
            self.generator.manual_seed(self.seed)

    def messages(self, extra: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history + (extra or [])

    def encode(self, user: str) -> list[int]:
        """The conversation plus the new message, dropping the oldest turns until it fits."""
        tok = self.engine.tok
        budget = self.engine.max_seq_length - self.max_new_tokens
        while True:
            ids = encode_chat(tok, self.messages([{"role": "user", "content": user}]))
            if len(ids) <= budget:
                return ids
            if not self.history:
                raise ValueError(f"this message is {len(ids)} tokens with the chat template; at most {budget} "
                                 f"fit (model.max_seq_length - generation.max_new_tokens)")
            del self.history[:2]  # one user turn and its answer

    def reply(self, user: str, on_text: Callable[[str], None] | None = None) -> RowResult:
        ids = self.encode(user)
        row = self.engine.generate_batch([ids], self.max_new_tokens, self.params, self.eos_ids, self.stop,
                                         self.generator, (lambda _b, t: on_text(t)) if on_text else None,
                                         catch_interrupt=True, reuse_prefix=True)[0]
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": row.text}]
        return row

    def command(self, line: str) -> str | None:
        """Handles /reset, /system TEXT, /exit, /help; returns a message to show, or None for /exit."""
        name, _, arg = line.strip().partition(" ")
        if name == "/exit" or name == "/quit":
            return None
        if name == "/reset":
            self.history.clear()
            return "(conversation reset)"
        if name == "/system":
            self.system = arg.strip() or None
            self.history.clear()
            return f"(system message {'set' if self.system else 'cleared'}; conversation reset)"
        return f"(unknown command {name}; {HELP})"


def chat_loop(session: ChatSession, stdin: TextIO, out: TextIO, interactive: bool) -> None:
    """Reads messages until /exit or end of input. Interactive: a prompt, and Ctrl-C at the prompt
    only clears the line. Piped: each input line is one message and answers are printed plainly."""
    if interactive:
        out.write(f"Chat with the model. {HELP}. Ctrl-C stops an answer, Ctrl-D or /exit quits.\n")
    while True:
        try:
            if interactive:
                out.flush()
                line = input("\n> ") + "\n"  # input() gives line editing on a terminal
            else:
                line = stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            continue
        except EOFError:
            line = ""
        if line == "":
            if interactive:
                out.write("\n")
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            msg = session.command(line)
            if msg is None:
                break
            out.write(msg + "\n")
            continue

        def write(text: str) -> None:
            out.write(text)
            out.flush()

        try:
            row = session.reply(line, write)
        except KeyboardInterrupt:
            out.write("\n(stopped)\n")
            continue
        out.write("\n" + ("(stopped)\n" if row.stop_reason == "interrupted" else ""))
        out.flush()

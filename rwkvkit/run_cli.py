"""``rwkvkit generate`` and ``rwkvkit chat``: running a model from the terminal.

Both stream text as it is produced and take the usual RWKV sampling options (the ChatRWKV
defaults: temperature 1.0, top_p 0.85, presence and frequency penalties 0.2 decaying by 0.996),
and the model options of ``rwkvkit.model_args`` (``--vocab``, ``--dtype``, ``--quantize int8``; the
vocabulary beside the model is found by itself).
``--state FILE`` starts from a saved conversation (``/save``) or a state-tuned file (one
``blocks.{i}.att.time_state`` per layer).

Chat uses the RWKV World format ``User: ...\\n\\nAssistant:``, stops each reply at ``\\n\\n``, and
keeps the conversation as a recurrent state: each turn only feeds the new message, and ``/save`` /
``/load`` write and read that state, so a reloaded conversation continues exactly.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import torch

from .generation import TextGeneration, generate
from .io import check_output, safe_torch_load
from .model_args import add_model_args, load_model_and_tokenizer
from .sampling import SamplingParams
from .state import State

CHAT_HELP = """commands:
  /reset        forget the conversation (back to the start state)
  /save FILE    save the conversation state to FILE (/save! FILE replaces an existing file)
  /load FILE    continue a conversation saved with /save
  /help         this text
  /quit         leave (also Ctrl-D)"""


def _common_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument(
        "--state", default=None, help="start from a saved state or a state-tuned (time_state) file"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (per reply in chat)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.85)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--presence-penalty", type=float, default=0.2)
    p.add_argument("--frequency-penalty", type=float, default=0.2)
    p.add_argument("--penalty-decay", type=float, default=0.996)
    p.add_argument("--seed", type=int, default=None, help="fix the sampling seed (reproducible output)")
    p.add_argument("--chunk-len", type=int, default=256, help="prompt tokens per prefill call")


def _sampling(args: argparse.Namespace, p: argparse.ArgumentParser) -> SamplingParams:
    if args.max_tokens is not None and args.max_tokens < 0:
        p.error(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.chunk_len <= 0:
        p.error(f"--chunk-len must be positive, got {args.chunk_len}")
    try:
        return SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            penalty_decay=args.penalty_decay,
            seed=args.seed,
        )
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable: p.error exits


def _open(args: argparse.Namespace, prog: str) -> tuple[torch.nn.Module, Any, State | None] | None:
    """Model, tokenizer and start state from the options; None (after one line on stderr) on failure."""
    from .hub import ModelNotFound

    try:
        model, tok, _ = load_model_and_tokenizer(args)
        state = load_state_file(args.state, model) if args.state else None
    except (ModelNotFound, ValueError, OSError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    return model, tok, state


def load_state_file(path: str, model: torch.nn.Module) -> State:
    """A state saved by rwkvkit (``State.save``) or a state-tuned file (``time_state`` keys), checked against ``model``."""
    try:
        state = State.load(path, device=str(model.device))
    except ValueError as first:
        try:
            sd = safe_torch_load(path, "state file", map_location="cpu")
        except ValueError:  # report the first, clearer error
            raise first from None
        if not isinstance(sd, dict) or not any(str(k).endswith("att.time_state") for k in sd):
            if isinstance(sd, dict) and sd.get("format") == "rwkvkit-state-1":
                raise first from None  # an rwkvkit state file with a problem: say which
            raise ValueError(
                f"{path!r} is neither an rwkvkit state file nor a state-tuned file (time_state keys)"
            ) from None
        state = State.from_time_state(sd, model.config).to(model.device)
    state.check(model.config, batch_size=1)
    return state


def _model_input(tokenizer: Any, text: str) -> str | list[int]:
    """Text typed or piped in, as the model should read it: ``text`` when it is valid Unicode; else
    (bytes that are not UTF-8, which Python hands over as surrogate escapes) the token ids of the bytes
    exactly as they were given."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return list(tokenizer.encode(text.encode("utf-8", "surrogateescape")))


def _stream(gen: TextGeneration, out: Any, strip_leading: bool = False) -> str:
    first = True
    for piece in gen:
        if first and strip_leading:
            piece = piece.lstrip(" ")
            if not piece:
                continue
        first = False
        out.write(piece)
        out.flush()
    return gen.text


def generate_main(argv: list[str] | None = None) -> int:
    """``rwkvkit generate --model PATH --prompt TEXT``: continue a prompt, streaming the text."""
    p = argparse.ArgumentParser(prog="rwkvkit generate", description=generate_main.__doc__)
    _common_args(p)
    p.add_argument("--prompt", default=None, help="the text to continue ('-' reads standard input)")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--save-state", default=None, help="write the state after the generated text to FILE")
    p.add_argument("--force", action="store_true", help="let --save-state replace an existing file")
    args = p.parse_args(argv)
    if args.prompt is None:
        p.error("--prompt is required ('-' reads it from standard input)")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        p.error("the prompt is empty")
    params = _sampling(args, p)
    if args.save_state:
        try:
            check_output(args.save_state, "--save-state", force=args.force, inputs=(args.model, args.state))
        except ValueError as e:
            print(f"rwkvkit generate: {e}", file=sys.stderr)
            return 2
    opened = _open(args, "rwkvkit generate")
    if opened is None:
        return 2
    model, tok, state = opened
    gen = generate(
        model,
        tok,
        _model_input(tok, prompt),
        max_tokens=200 if args.max_tokens is None else args.max_tokens,
        sampling=params,
        stop=args.stop,
        state=state,
        chunk_len=args.chunk_len,
    )
    assert isinstance(gen, TextGeneration)
    _stream(gen, sys.stdout)
    sys.stdout.write("\n")
    if args.save_state:
        assert gen.state is not None
        gen.state.save(args.save_state)
    return 0


class ChatSession:
    """A conversation as a recurrent state; ``reply(message)`` streams the assistant's answer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, params: SamplingParams, *,
                 max_tokens: int = 500, start: State | None = None, chunk_len: int = 256) -> None:  # fmt: skip
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.max_tokens, self.chunk_len = max_tokens, chunk_len
        self.start = start
        self.reset()

    def reset(self) -> None:
        self.state: State | None = self.start.clone() if self.start is not None else None
        self.needs_separator = False  # True when the last reply did not end with '\n\n'

    def save(self, path: str, force: bool = False, inputs: tuple[str | None, ...] = ()) -> None:
        """Write the conversation's state to ``path``: ValueError for an existing file (unless
        ``force``), one of ``inputs``, a folder, or a folder that does not exist."""
        check_output(path, "/save", force=force, inputs=inputs, hint="'/save! FILE' replaces it")
        state = self.state if self.state is not None else self.model.init_state(1)
        state.save(path)

    def load(self, path: str) -> None:
        self.state = load_state_file(path, self.model)
        self.needs_separator = False

    def reply(self, message: str, out: Any) -> str:
        text = re.sub(r"\n\s*\n", "\n", message.strip())  # '\n\n' ends a turn; keep it out of the message
        prompt = ("\n\n" if self.needs_separator else "") + f"User: {text}\n\nAssistant:"
        prompt = _model_input(self.tokenizer, prompt)
        gen = generate(self.model, self.tokenizer, prompt, max_tokens=self.max_tokens, sampling=self.params,
                       stop="\n\n", state=self.state, chunk_len=self.chunk_len)  # fmt: skip
        assert isinstance(gen, TextGeneration)
        answer = _stream(gen, out, strip_leading=True)
        self.state = gen.state
        # the token that completed '\n\n' was fed; any other ending needs a separator before the next turn
        self.needs_separator = gen.finish_reason != "stop" or not gen.tokens
        return answer.strip()


def chat_main(argv: list[str] | None = None) -> int:
    """``rwkvkit chat --model PATH``: chat in the terminal (User/Assistant format, streaming)."""
    p = argparse.ArgumentParser(prog="rwkvkit chat", description=chat_main.__doc__, epilog=CHAT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _common_args(p)
    args = p.parse_args(argv)
    params = _sampling(args, p)
    opened = _open(args, "rwkvkit chat")
    if opened is None:
        return 2
    model, tok, start = opened
    chat = ChatSession(model, tok, params, max_tokens=args.max_tokens or 500, start=start,
                       chunk_len=args.chunk_len)  # fmt: skip
    out = sys.stdout
    out.write("rwkvkit chat: type a message, /help for commands.\n")
    while True:
        out.write("User: ")
        out.flush()
        line = sys.stdin.readline()
        if not line:
            out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/help":
                out.write(CHAT_HELP + "\n")
            elif cmd == "/reset":
                chat.reset()
                out.write("(conversation reset)\n")
            elif cmd in ("/save", "/save!", "/load") and not arg:
                out.write(f"usage: {cmd} FILE\n")
            elif cmd in ("/save", "/save!"):
                try:
                    chat.save(arg, force=cmd == "/save!", inputs=(args.model, args.state))
                    out.write(f"(saved to {arg})\n")
                except (OSError, ValueError) as e:
                    out.write(f"cannot save: {e}\n")
            elif cmd == "/load":
                try:
                    chat.load(arg)
                    out.write(f"(loaded {arg})\n")
                except (OSError, ValueError) as e:
                    out.write(f"cannot load: {e}\n")
            else:
                out.write(f"unknown command {cmd!r}; /help lists them\n")
            continue
        out.write("Assistant: ")
        chat.reply(line, out)
        out.write("\n\n")

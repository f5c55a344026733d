"""The lm-evaluation-harness backend: `llamazoo` as an lm_eval model, and `llamazoo eval harness`.

Importing this module imports lm_eval (slow: seconds) and registers the model as "llamazoo", so
`lm_eval.simple_evaluate(model="llamazoo", model_args="pretrained=PATH,dtype=float32,batch_size=8")`
works after `import llamazoo.evaluation.harness`. lm_eval 0.4 discovers no models outside its own source
tree, so its `lm_eval` command cannot; `llamazoo eval lm_eval ARGS` is that command with this one added.

Requests are scored as lm_eval's own `hf` backend scores them (same tokenization, truncation, rolling
windows, stop handling and decoding) and computed differently:
- loglikelihood: requests are grouped by context; all continuations of one context share one row and one
  forward pass (llamazoo.evaluation.scoring), rows longest first, the LM head only where a scored token
  is predicted;
- loglikelihood_rolling: lm_eval's disjoint windows, scored the same way, batched across documents;
- generate_until: llamazoo's generation engine (batched, left-padded, KV cache, stop strings), prompts
  longest first per set of generation arguments.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llamazoo.config import EvalConfig, EvalSection, ModelSection
from llamazoo.evaluation.scoring import Group, score_groups

LOG = logging.getLogger("llamazoo.eval")

MODEL_ARGS = ("pretrained", "adapter", "dtype", "quantize", "device", "batch_size", "max_length", "max_gen_toks",
              "add_bos_token", "prefix_token_id", "threads", "max_batch_size")


@register_model("llamazoo")
class LlamazooLM(TemplateLM):
    """lm_eval model args: pretrained (a HF folder or "default"), adapter (a LoRA folder merged at load),
    dtype (float32 | bfloat16 | float16 | auto), quantize (none | int8 | int4), device (cpu | cuda | auto),
    batch_size (see scoring.plan_batches), max_length (default: the model's max_position_embeddings),
    max_gen_toks (256), add_bos_token, prefix_token_id, threads.
    Under torchrun each process takes a share of the requests (lm_eval's data parallel)."""

    def __init__(self, pretrained: str = "default", adapter: str | None = None, dtype: str = "auto",
                 quantize: str = "none", device: str | None = None,
                 batch_size: int | str = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 threads: int | None = None, max_batch_size: int | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise ValueError(f"llamazoo model_args: unknown {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(MODEL_ARGS)}")
        try:
            self._batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"llamazoo model_args: batch_size={batch_size!r}; give a number of requests per "
                             f"forward pass (no 'auto')") from None
        if self._batch_size < 1:
            raise ValueError(f"llamazoo model_args: batch_size={batch_size} must be >= 1")
        dev = str(device) if device else "auto"
        if dev.startswith("cuda") and not torch.cuda.is_available():
            dev = "cpu"  # lm_eval's command line passes cuda:0 unless told
        dev = "cuda" if dev.startswith("cuda") else dev
        cfg = EvalConfig(checkpoint={"model_name_or_path": str(pretrained), "adapter": adapter},
                         model=ModelSection(dtype=dtype, quantize=quantize, device=dev),
                         eval=EvalSection(batch_size=self._batch_size, threads=threads))
        self._init_from_config(cfg, max_length, max_gen_toks, add_bos_token, prefix_token_id)

    @classmethod
    def from_config(cls, cfg: EvalConfig, **kwargs: Any) -> "LlamazooLM":
        """From a `llamazoo eval` config (checkpoint, model and eval sections)."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self._batch_size = cfg.eval.batch_size
        self._init_from_config(cfg, **kwargs)
        return self

    def _init_from_config(self, cfg: EvalConfig, max_length: int | None = None, max_gen_toks: int = 256,
                          add_bos_token: bool | None = None, prefix_token_id: int | None = None) -> None:
        from llamazoo.distributed.mesh import env_world, init_parallel
        from llamazoo.evaluation.perplexity import load_for_eval
        from llamazoo.generation.app import default_eos_ids
        from llamazoo.generation.engine import Engine
        from llamazoo.generation.packed import SCORING_HINT

        if env_world()[1] > 1:
            ctx = init_parallel(1, cfg.model.torch_device())
            self._rank, self._world_size = ctx.dp_rank, ctx.dp_size
        loaded = load_for_eval(cfg)
        self.model, self.tok = loaded.model, loaded.tokenizer
        self.tokenizer = self.tok.hf  # what lm_eval's chat-template helpers read
        self.folder = loaded.folder
        self.pretrained = cfg.checkpoint.model_name_or_path or "default"
        self._device = self.model.lm_head.weight.device
        self._max_length = int(max_length) if max_length else int(self.model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.eos_ids = default_eos_ids(self.model, self.tok, loaded.folder)
        # the engine packs the CPU weights (fused, prepacked projections), which scoring uses too
        self.engine = Engine(self.model, self.tok, max_seq_length=self._max_length, pack_batch_hint=SCORING_HINT)

    # -- what lm_eval reads ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and the first rolling window) starts from: BOS, else EOS."""
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.folder or self.pretrained).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """The tokenizer's defaults (add_bos_token overrides them), and no second BOS on text that starts
        with one (a chat-templated prompt), as lm_eval's hf backend encodes."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        import jinja2

        def render(messages: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:  # templates without a system role
            LOG.warning("the chat template failed; trying again without the system message")
            return render([m for m in chat_history if m["role"] != "system"])

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.lm_head.weight.dtype), "model_revision": "", "model_sha": ""}

    # -- data parallel (torchrun) ------------------------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # -- requests ----------------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) per (context, continuation) token pair; a pair longer
        than max_length + 1 loses tokens on the left, as in the hf backend. Pairs with the same context
        share one group (one row, one forward pass); repeated pairs are scored once."""
        groups: dict[tuple[int, ...], tuple[Group, dict[tuple[int, ...], int]]] = {}
        where: list[tuple[tuple[int, ...], int]] = []
        for ctx, cont in pairs:
            if not ctx or not cont:
                raise ValueError("loglikelihood: a request tokenized to an empty context or continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"loglikelihood: a continuation of {len(cont)} tokens is longer than "
                                 f"max_length={self.max_length}")
            whole = list(ctx) + list(cont)
            if len(whole) > self.max_length + 1:
                ctx = whole[-(self.max_length + 1):-len(cont)]
            key = tuple(ctx)
            group, index = groups.setdefault(key, (Group(list(ctx), []), {}))
            ckey = tuple(cont)
            if ckey not in index:
                index[ckey] = len(group.continuations)
                group.continuations.append(list(cont))
            where.append((key, index[ckey]))
        keys = list(groups)
        total = sum(len(g.continuations) for g, _ in groups.values())
        with tqdm(total=total, desc=desc, disable=disable_tqdm or self.rank != 0) as bar:
            scores = score_groups(self.model, [groups[k][0] for k in keys], self.batch_size, bar.update)
        by_key = dict(zip(keys, scores))
        return [(by_key[key][k].logprob, by_key[key][k].greedy) for key, k in where]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        answers = self._score([(ctx, cont) for _, ctx, cont in requests], "llamazoo loglikelihood", disable_tqdm)
        for (request, _, _), answer in zip(requests, answers):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over lm_eval's disjoint rolling windows of max_length tokens
        (the first conditioned on prefix_token_id), all windows of all documents batched together."""
        pairs, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                pairs.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score(pairs, "llamazoo loglikelihood_rolling", disable_tqdm)):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations on llamazoo's engine, cut at the first stop sequence (the
        EOS text is one), decoded without special tokens, as the hf backend returns them."""
        from llamazoo.generation.sampling import SamplingParams

        args = [req.args for req in requests]
        by_kwargs: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            if not isinstance(gen_kwargs, dict):
                raise ValueError(f"generate_until: generation arguments must be a dict, got {gen_kwargs!r}")
            by_kwargs.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str | None] = [None] * len(args)
        generator = torch.Generator(device=self.device).manual_seed(1234)
        with tqdm(total=len(args), desc="llamazoo generate_until", disable=disable_tqdm or self.rank != 0) as bar:
            for indices in by_kwargs.values():
                kwargs = normalize_gen_kwargs(args[indices[0]][1], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_new = int(kwargs.pop("max_gen_toks"))
                budget = self.max_length - max_new
                if budget <= 0:
                    raise ValueError(f"generate_until: max_gen_toks={max_new} leaves no room for a prompt in "
                                     f"max_length={self.max_length}")
                params = SamplingParams(do_sample=bool(kwargs.get("do_sample")),
                                        temperature=float(kwargs.get("temperature") or 1.0),
                                        top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
                prompts = {i: self._encode_prompt(args[i][0])[-budget:] for i in indices}
                order = sorted(indices, key=lambda i: -len(prompts[i]))
                for s in range(0, len(order), self.batch_size):
                    batch = order[s:s + self.batch_size]
                    rows = self.engine.generate_batch([prompts[i] for i in batch], max_new, params, self.eos_ids,
                                                      until, generator)
                    for i, row in zip(batch, rows):
                        text = postprocess_generated_text(self.tok_decode(row.token_ids), until, None)
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", args[i], text)
                    bar.update(len(batch))
        return out  # type: ignore[return-value]

    def _encode_prompt(self, context: str) -> list[int]:
        """As the hf backend's batch encoding: no added BOS on text that starts with one, else add_bos_token
        if given, else the tokenizer's defaults."""
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            return self.tokenizer.encode(context, add_special_tokens=False)
        return self.tokenizer.encode(context, **_add_special_kwargs(None, self.add_bos_token))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LlamazooLM":
        """model_args win over lm_eval's own --batch_size / --device (its command line always passes them)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "LlamazooLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)


# -- llamazoo eval harness / lm_eval ---------------------------------------------------------------------
def task_manager(include_path: str | None, tasks: list[str]):
    """lm_eval's TaskManager. Indexing lm_eval's ~200 built-in task folders takes tens of seconds, so
    when every task is found in include_path the built-ins are not indexed."""
    from lm_eval.tasks import TaskManager

    if include_path:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"--include_path: {include_path} is not a folder")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def run_harness(cfg: EvalConfig, tasks: str, limit: float | None = None, num_fewshot: int | None = None,
                include_path: str | None = None, apply_chat_template: bool = False,
                fewshot_as_multiturn: bool = False, system_instruction: str | None = None,
                gen_kwargs: str | None = None, log_samples: bool = False, seed: int = 0,
                out=None) -> dict[str, Any] | None:
    """The whole `llamazoo eval harness`: lm_eval.simple_evaluate on the llamazoo backend; rank 0 prints
    lm_eval's table and writes the results (eval.output). Returns the results (None on other ranks)."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    from llamazoo.evaluation.perplexity import write_json

    out = out or sys.stdout
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks: give at least one task name")
    manager = task_manager(include_path, names)
    missing = [t for t in names if t not in manager.all_tasks and not manager.match_tasks([t])]
    if missing:
        raise ValueError(f"--tasks: unknown task {missing[0]!r}" +
                         ("" if include_path else "; tasks over local data need --include_path FOLDER_OF_YAMLS"))
    lm = LlamazooLM.from_config(cfg)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
        system_instruction=system_instruction, gen_kwargs=gen_kwargs, log_samples=log_samples,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:  # not rank 0
        return None
    results["config"]["model"] = "llamazoo"
    results["config"]["model_args"] = {"pretrained": lm.pretrained, "dtype": str(lm.model.lm_head.weight.dtype),
                                       "batch_size": lm.batch_size}
    out.write(make_table(results) + "\n")
    if results.get("groups"):
        out.write(make_table(results, "groups") + "\n")
    out.flush()
    if cfg.eval.output:
        write_json(json.loads(json.dumps(results, default=handle_non_serializable)), cfg.eval.output)
    return results


def run_lm_eval_cli(argv: list[str]) -> int:
    """lm_eval's own command line (`lm_eval ...`) with this module's "llamazoo" model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = saved
    return 0


__all__ = ["LlamazooLM", "run_harness", "run_lm_eval_cli", "task_manager"]

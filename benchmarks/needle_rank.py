"""Where an in-LLM pruner's ranking puts the needle: the rank of the pass key's tokens by the attention a decoder
layer gives them, from the last query (FastV) and from the question's queries (TransPrune's instruction attention),
and the second averaged over ``--pool`` neighbouring context tokens (``fastv(queries='instruction', pool=...)``).

One full forward pass per sample (no pruning); each layer's ranking attention is recomputed from that layer's input
with :func:`kvsieve.sequence.received_attention`, exactly as the pruners rank. A needle token ranked below
``keep x context`` is dropped by a single-stage pruner at that keep share.

    python benchmarks/needle_rank.py                         # 3 passkey samples, 4,096 tokens, layers 2, 8, 12, 16
    python benchmarks/needle_rank.py --samples 10 --layers 4,8 --context 2048
"""

from __future__ import annotations

import argparse

import torch

from kvsieve import load_model
from kvsieve.bench.runner import split_prompt
from kvsieve.methods.fastv import pooled
from kvsieve.sequence import received_attention
from kvsieve.tasks import get_task


def needle_rows(tok, ids: list[int], answer: str) -> list[int]:
    """Context rows where the pass key starts: the token holds its first digit and the text from there on begins with
    the whole key (SmolLM2 writes one digit per token)."""
    width = len(answer) + 2
    return [
        i
        for i, t in enumerate(ids)
        if answer[0] in tok.decode([t]) and tok.decode(ids[i : i + width]).strip().startswith(answer)
    ]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--layers", default="2,8,12,16")
    parser.add_argument("--keep", type=float, default=0.25, help="the keep share the ranks are read against")
    parser.add_argument("--pool", type=int, default=15, help="window of the pooled question ranking (odd)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    n_layers = model.config.num_hidden_layers
    if args.pool < 1 or args.pool % 2 == 0:
        raise SystemExit(f"error: --pool must be an odd number >= 1; got {args.pool}")
    if any(not 0 <= k < n_layers for k in layers):
        raise SystemExit(f"error: --layers must lie in 0..{n_layers - 1}; got {args.layers}")
    print(f"rank of the pass key's first token among the context (0 = most attended); kept at keep {args.keep} if <")
    for s, sample in enumerate(get_task("passkey").generate(tok, length=args.context, n=args.samples, seed=0)):
        p = split_prompt(tok, sample)
        context = p.context[0]
        ids = torch.cat([context, p.question[0], p.answer_prefix[0]])[None]
        n, nc = ids.shape[1], context.shape[0]
        needle = needle_rows(tok, context.tolist(), sample.answers[0])
        if not needle:
            print(f"sample {s}: pass key not found as a token of the context, skipped")
            continue
        out = model(ids, output_hidden_states=True)
        emb = model.model.rotary_emb(out.hidden_states[0], torch.arange(n)[None])
        last = torch.zeros(1, n, dtype=torch.bool)
        last[0, -1] = True
        question = torch.zeros(1, n, dtype=torch.bool)
        question[0, nc:] = True
        cells = []
        for k in layers:
            for name, rows in (("last", last), ("question", question)):
                score = received_attention(model.model.layers[k], out.hidden_states[k], emb, rows)[0, :nc]
                cells.append(f"L{k} {name} {int((score > score[needle[0]]).sum()):,}")
                if name == "question":
                    score = pooled(score[None], torch.ones(1, nc, dtype=torch.bool), args.pool)[0]
                    cells.append(f"pooled {int((score > score[needle[0]]).sum()):,}")
        print(f"sample {s} ({nc:,} context tokens, kept if < {int(nc * args.keep):,}): " + "; ".join(cells))


if __name__ == "__main__":
    main()

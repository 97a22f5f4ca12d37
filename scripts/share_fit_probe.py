"""Cross-layer KV sharing on SmolLM2 (issue 24): layers ``i`` sharing layer ``i - 1``'s KV
cache, unfitted (KVSharer) and refitted (``pruning/methods/share_fit.py``, 16 x 256 tokens of
WikiText-2 validation): per-layer relative logit and attention-output errors on the
calibration tokens, and WikiText-2 test perplexity on 8 windows of 1,024 tokens (HF
reference, fp32). Usage: ``python scripts/share_fit_probe.py 5,10,15,20,25``."""
import json
import sys
import time

import torch

from harp_vllm import models
from harp_vllm.evaluation.data import load_text
from harp_vllm.evaluation.perplexity import evaluate_perplexity
from harp_vllm.pruning.calibration.windows import calibration_windows
from harp_vllm.pruning.methods.share_fit import apply_fit, fit_shared
from harp_vllm.pruning.reference import load_model, shared

if __name__ == "__main__":
    torch.set_num_threads(2)
    src = models.prepare("smollm2-135m", progress=False)
    tok = models.load_tokenizer(src)
    calib = calibration_windows(tok, load_text("wikitext2", "validation"), 16, 256)
    test = load_text("wikitext2", "test")
    pairs = {int(a): int(a) - 1 for a in sys.argv[1].split(",")}
    model = load_model(src)
    out: dict = {"pairs": pairs, "calib": list(calib.shape)}
    t0 = time.time()

    def ppl() -> float:
        return evaluate_perplexity(model, tok, test, 1024, max_windows=8,
                                   progress=False).perplexity

    out["ppl_dense"] = ppl()
    with shared(model, pairs):
        out["ppl_shared"] = ppl()
    fits = {i: fit_shared(model, i, j, calib) for i, j in pairs.items()}
    out["errors"] = {i: {"logit": f.logit_error, "output": f.output_error}
                     for i, f in fits.items()}
    for i, f in fits.items():
        apply_fit(model, i, f)
    with shared(model, pairs):
        out["ppl_shared_fitted"] = ppl()
    out["seconds"] = time.time() - t0
    print(json.dumps(out, indent=1))

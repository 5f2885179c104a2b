"""The tiny model quantized without calibration data (llm-compressor `oneshot` with a scheme preset), for the
real-engine tests and the qualification bench. A script, not a function: it runs in the calibrate environment
(`python -c QUANTIZE SRC OUT SCHEME...`, one folder per scheme under OUT), which has llm-compressor and not this
package."""

QUANTIZE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
src, out = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(src)
for scheme in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    oneshot(model=model, recipe=[QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])])
    model.save_pretrained(f"{out}/{scheme}", save_compressed=True)
    tok.save_pretrained(f"{out}/{scheme}")
"""

"""TTA cost: inference time with the 8 dihedral (d4) views over plain inference, same model and
images, through the pipeline's batched inference (engine.predict_logits).

    python -m bench.tta [--quick] [--model resnet18] [--size 64] [--batch 32] [--device cpu]

The views of a batch are stacked on the batch dimension and run in one forward pass, so d4 costs
8x the model's work plus the view copies; the target is at most 8.5x plain inference. Images come
from memory (uint8, normalised on the device as in prediction); runs alternate, medians reported.
"""

from __future__ import annotations

import torch

from bench import (
    Table,
    cores,
    interleaved,
    limited_threads,
    model_bench_parser,
    run_model_bench,
    verdict,
)
from pipeline.base.config import TTAConfig
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD, Normalizer
from pipeline.inference.engine import amp_dtype, predict_logits, resolve_device
from pipeline.inference.predictor import tta_views
from pipeline.models.factory import create_model

TARGET_RATIO = 8.5  # d4 seconds over plain seconds, at most


def measure(model_name: str, size: int, batch: int, batches: int, rounds: int,
            device_name: str = "cpu", amp: bool = True, channels_last: bool = True,
            threads: int | None = None) -> dict:
    threads = threads or torch.get_num_threads()
    with limited_threads(threads):
        result = _measure(model_name, size, batch, batches, rounds, device_name, amp, channels_last)
    return {**result, "threads": threads}


def _measure(model_name: str, size: int, batch: int, batches: int, rounds: int,
             device_name: str, amp: bool, channels_last: bool) -> dict:
    device = resolve_device(device_name)
    on_cuda = device.type == "cuda"
    dtype = amp_dtype(device, amp)
    torch.manual_seed(0)
    model = create_model(model_name, 5).to(device).eval()
    if on_cuda and channels_last:
        model.to(memory_format=torch.channels_last)
    normalizer = Normalizer(IMAGENET_MEAN, IMAGENET_STD, on_cuda and channels_last).to(device)
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator),
             torch.zeros(batch, dtype=torch.long)) for _ in range(batches)]
    if on_cuda:
        data = [(x.pin_memory(), y) for x, y in data]
    images = batch * batches

    def predict(views) -> int:
        predict_logits(model, normalizer, data, device, dtype=dtype, desc="bench tta", views=views)
        return images  # predict_logits ends with a copy to the host: the device is done

    d4 = tta_views(TTAConfig(views="d4"), size)
    contenders = {"plain": lambda: predict(None), "d4": lambda: predict(d4)}
    for run in contenders.values():
        run()  # warm-up
    rates = interleaved(contenders, rounds)
    plain = rates.median("plain")
    return {"model": model_name, "size": size, "batch": batch, "device": str(device),
            "precision": str(dtype).replace("torch.", "") if dtype else "float32",
            "plain": plain, "d4": rates.median("d4"), "d4 ratio": plain / rates.median("d4"),
            "plain range": rates.spread("plain"), "d4 range": rates.spread("d4"),
            "cpu d4 ratio": (rates.median("plain", "cpu") / rates.median("d4", "cpu")
                             if device.type == "cpu" and torch.get_num_threads() == 1 else None)}


HEADERS = ["model", "px", "batch", "precision", "CPU threads", "plain img/s (range)",
           "d4 img/s (range)", "d4 / plain time", "target", "same, in CPU time"]


def result_rows(results: list[dict]) -> list[list]:
    return [[r["model"], r["size"], r["batch"], r["precision"], r["threads"],
             f"{r['plain']:.1f} ({r['plain range']})", f"{r['d4']:.1f} ({r['d4 range']})",
             f"{r['d4 ratio']:.2f}x",
             f"<= {TARGET_RATIO}x: {verdict(r['d4 ratio'], TARGET_RATIO, higher_is_better=False)}",
             "-" if r["cpu d4 ratio"] is None else f"{r['cpu d4 ratio']:.2f}x"]
            for r in results]


def run(quick: bool = False, configs: list[tuple[str, int, int]] | None = None,
        device: str = "cpu", amp: bool = True, channels_last: bool = True,
        rounds: int | None = None, threads: list[int] | None = None) -> list[Table]:
    configs = configs or [("resnet20", 32, 32) if quick else ("resnet18", 64, 32)]
    threads = threads or ([1] if quick else sorted({1, cores()}))
    rounds = rounds or (3 if quick else 7)
    batches = 2
    results = [measure(m, s, b, batches, rounds, device, amp, channels_last, t)
               for m, s, b in configs for t in threads]
    return [Table(f"TTA cost on {device}: median of {rounds} alternating runs over {batches} "
                  f"batches (in-memory images)", HEADERS, result_rows(results))]


def main(argv=None) -> None:
    parser = model_bench_parser("python -m bench.tta", __doc__.split("\n")[0],
                                "resnet20 at 32 px, 3 rounds",
                                "default: resnet18 at 64 px, batch 32", "alternating runs (7)")
    run_model_bench(run, parser.parse_args(argv), "TTA cost")


if __name__ == "__main__":
    main()

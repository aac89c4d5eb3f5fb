"""Image tasks: generators (what the sample says is what is drawn, seeded determinism) and the bench end to end on a
tiny random-weight LLaVA saved with its processor (rows, images reaching the vision tower, pruned tokens)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image, ImageChops

from kvsieve.errors import KVSieveError
from kvsieve.tasks import TASKS, ImageTask, get_task
from kvsieve.tasks.image import COLOURS, QUADRANTS, _font, render_scene

warnings.filterwarnings("ignore", category=FutureWarning)

IMAGE_TASKS = ["image_text", "image_objects", "image_needle", "image_document"]


@pytest.fixture(scope="module")
def tokenizer():
    from kvsieve.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _same(a: Image.Image, b: Image.Image) -> bool:
    return ImageChops.difference(a, b).getbbox() is None


def _text_only(side: int, text: str, xy, size: int, background=(245, 245, 240)) -> Image.Image:
    from PIL import ImageDraw

    image = Image.new("RGB", (side, side), background)
    ImageDraw.Draw(image).text(tuple(xy), text, font=_font(size), fill=(15, 15, 15))
    return image


def test_image_tasks_are_registered_and_describe_themselves():
    for name in IMAGE_TASKS:
        task = get_task(name)
        assert isinstance(task, ImageTask) and TASKS[name] is task
        assert task.description and task.metric == "string_match_all" and not task.uses_depth


@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_same_seed_same_samples_and_pixels_other_seed_differs(tokenizer, name):
    task = get_task(name)
    a, b = task.generate(tokenizer, 256, 3, seed=5), task.generate(tokenizer, 256, 3, seed=5)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    json.dumps([s.to_dict() for s in a])  # a sample is a JSON record; its images are rendered from it
    for x, y in zip(a, b, strict=True):
        assert all(_same(i, j) for i, j in zip(task.images(x), task.images(y), strict=True))
    other = task.generate(tokenizer, 256, 3, seed=6)
    assert [s.answers for s in a] != [s.answers for s in other] or [s.meta for s in a] != [s.meta for s in other]
    for s in a:
        images = task.images(s)
        assert len(images) == task.images_per_sample and s.answers and s.depth is None
        assert all(im.size == (s.meta["scenes"][k]["side"],) * 2 for k, im in enumerate(images))
        assert s.n_tokens > 0 and s.answers[0].lower() not in (s.question + s.answer_prefix).lower()


def test_image_text_draws_exactly_the_answer(tokenizer):
    task = get_task("image_text")
    for s in task.generate(tokenizer, 320, 8, seed=0):
        (image,) = task.images(s)
        (text, xy, size) = s.meta["scenes"][0]["texts"][0]
        assert text == s.answers[0]
        drawn = _text_only(320, s.answers[0], xy, size)
        box = s.meta["scenes"][0]["text_box"]
        # inside the text's box the image is the answer's glyphs and nothing else (shapes never overlap it)
        assert _same(image.crop(box), drawn.crop(box))
        wrong = _text_only(320, s.answers[0][::-1] + "x", xy, size)
        assert not _same(image.crop(box), wrong.crop(box))


def test_image_objects_answers_match_the_pixels(tokenizer):
    task = get_task("image_objects")
    samples = task.generate(tokenizer, 256, 24, seed=1)
    assert {s.meta["kind"] for s in samples} == {"colour", "shape", "count", "position"}
    for s in samples:
        (image,) = task.images(s)
        shapes = s.meta["scenes"][0]["shapes"]
        for shape, box, colour in shapes:  # every object's centre has its colour
            centre = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2 + (box[3] - box[1]) // 6 * (shape == "triangle"))
            assert image.getpixel(centre) == COLOURS[colour]
        answer = s.answers[0]
        if s.meta["kind"] == "count":
            colour, shape = s.question.split("How many ")[1].split("s are")[0].split(" ")
            assert sum(1 for sh, _, c in shapes if (sh, c) == (shape, colour)) == int(answer)
        elif s.meta["kind"] == "colour":
            assert [c for sh, _, c in shapes if sh in s.question] == [answer]
        elif s.meta["kind"] == "shape":
            assert [sh for sh, _, c in shapes if f" {c} " in s.question] == [answer]
        else:
            (box,) = [b for sh, b, c in shapes if f"{c} {sh}" in s.question]
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            assert answer == QUADRANTS[(cy > 128) * 2 + (cx > 128)]


def test_image_needle_one_image_holds_the_number(tokenizer):
    task = get_task("image_needle")
    samples = task.generate(tokenizer, 256, 8, seed=2)
    assert len({s.meta["needle_image"] for s in samples}) > 1
    for s in samples:
        images = task.images(s)
        with_text = [k for k, scene in enumerate(s.meta["scenes"]) if scene.get("texts")]
        assert with_text == [s.meta["needle_image"]]
        assert s.meta["scenes"][with_text[0]]["texts"][0][0] == s.answers[0]
        assert not _same(images[with_text[0]], render_scene({**s.meta["scenes"][with_text[0]], "texts": []}))


def test_image_document_lines_hold_the_asked_value_once(tokenizer):
    task = get_task("image_document")
    for s in task.generate(tokenizer, 384, 6, seed=3):
        lines = [t for t, _, _ in s.meta["scenes"][0]["texts"][1:]]
        asked = [line for line in lines if line.lower().startswith(s.meta["key"] + ":")]
        assert asked == [f"{s.meta['key'].capitalize()}: {s.answers[0]}"]
        assert sum(s.answers[0] in line for line in lines) == 1


def test_too_small_images_are_refused(tokenizer):
    with pytest.raises(KVSieveError, match="pixels"):
        get_task("image_text").generate(tokenizer, 32, 1, seed=0)


# -- the bench on a tiny VLM --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory, tokenizer):
    """A tiny random-weight LLaVA (CLIP 32 px, 16 image tokens) saved with a processor and a chat template."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    from tiny_vlms import llava

    path = tmp_path_factory.mktemp("tiny-llava")
    tokenizer.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tok.convert_tokens_to_ids("<image>")
    model, _ = llava(vocab=len(tok), image_token=image_token)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}{% if c.type == 'image' %}<image>\n"
        "{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=template).save_pretrained(path)  # fmt: skip
    return path


def _bench(vlm_dir, out, tasks, sequences, mode="aware", methods=("full",), **kw):
    from kvsieve.bench.runner import BenchConfig, Runner

    config = BenchConfig(model=str(vlm_dir), tasks=list(tasks), methods=list(methods), compressions=[0.5],
                         lengths=[256], samples=1, mode=mode, sequences=list(sequences), out=str(out),
                         **kw)  # fmt: skip
    return Runner(config)


def test_bench_runs_image_tasks_through_the_processor_and_prunes_image_tokens(vlm_dir, tmp_path):
    runner = _bench(vlm_dir, tmp_path / "b", IMAGE_TASKS,
                    ["none", "visionzip(keep=0.25)", "fopru(keep=0.5)", "fastv(layer=1, keep=0.5)"])  # fmt: skip
    from kvsieve import build

    spec = {s: build(s).spec() for s in ("fopru(keep=0.5)", "fastv(layer=1, keep=0.5)")}  # defaults are dropped
    assert all(len(u.jobs) == 1 for u in runner.plan())  # image prompts never share a text prefill snapshot
    from kvsieve.models import load_model

    runner.model, _ = load_model(vlm_dir)
    seen: list[torch.Tensor] = []
    tower = runner.model.model.vision_tower
    handle = tower.register_forward_pre_hook(
        lambda m, args, kw: seen.append(args[0] if args else kw["pixel_values"]), with_kwargs=True
    )
    hooks = len(tower._forward_pre_hooks)
    try:
        rows = runner.run()
    finally:
        handle.remove()
    assert hooks == 1
    assert len(rows) == 4 * 4
    by = {(r["task"], r["sequence"]): r for r in rows}
    for name in IMAGE_TASKS:
        n_images = get_task(name).images_per_sample
        full = by[(name, None)]
        assert full["images"] == n_images and full["image_tokens"] == 16 * n_images
        assert full["kv_tokens"] == full["context_tokens"]
        zipped = by[(name, "visionzip(keep=0.25)")]
        assert zipped["kv_tokens"] == full["context_tokens"] - 12 * n_images  # 4 of 16 image tokens per image
        assert by[(name, spec["fopru(keep=0.5)"])]["kv_tokens"] == full["context_tokens"] - 8 * n_images
        fastv = by[(name, spec["fastv(layer=1, keep=0.5)"])]
        assert full["kv_tokens"] - 8 * n_images * 2 / 4 == fastv["kv_tokens"]  # layers 2 and 3 of 4 hold 8 fewer
        for r in (full, zipped, fastv):
            assert 0.0 <= r["score"] <= 1.0 and r["prefill_seconds"] > 0 and r["answers"]
    # every prefill gave the vision tower the processor's pixels of the sample's images
    processor = runner.processor or __import__("kvsieve.models").models.load_processor(vlm_dir)
    sample = runner.samples().__next__()[2]
    expected = processor.image_processor(get_task(sample.task).images(sample), return_tensors="pt")["pixel_values"]
    assert len(seen) == len(rows) and torch.equal(seen[0], expected)


def test_bench_agnostic_mode_and_cache_methods_on_image_prompts(vlm_dir, tmp_path):
    runner = _bench(vlm_dir, tmp_path / "c", ["image_text"], [], mode="agnostic", methods=("full", "snapkv"))
    rows = runner.run()
    assert {r["method"] for r in rows} == {"full", "snapkv"}
    full, snap = sorted(rows, key=lambda r: r["method"] != "full")
    assert snap["kv_tokens"] == full["context_tokens"] // 2 and full["image_tokens"] == 16


def test_image_tasks_on_a_text_model_are_refused_with_the_fix(tmp_path):
    from kvsieve.bench.runner import BenchConfig, Runner

    config = BenchConfig(model="smollm2-135m", tasks=["passkey", "image_text"], methods=["full"], lengths=[256],
                         out=str(tmp_path / "t"))  # fmt: skip
    with pytest.raises(KVSieveError, match=r"image_text needs a vision-language model .* pass --model") as info:
        Runner(config)
    assert "\n" not in str(info.value)


def test_cli_bench_on_an_image_task(vlm_dir, tmp_path):
    from kvsieve.cli import main

    out = tmp_path / "cli"
    code = main(["bench", "--model", str(vlm_dir), "--tasks", "image_document", "--methods", "full", "--lengths",
                 "256", "--samples", "1", "--mode", "aware", "--sequence", "none,hiprune(keep=0.5)", "--out",
                 str(out)])  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["sequence"] for r in rows} == {None, "hiprune"}  # keep=0.5 is hiprune's default
    assert rows[1]["kv_tokens"] == rows[0]["kv_tokens"] - 8
    assert (out / "report.html").is_file() or any(out.iterdir())


class _QwenProcessor:
    """Qwen2-VL's processor logic (this machine lacks torchvision, which transformers' Qwen2VLProcessor needs for its
    video half): the image processor's patches, each ``<|image_pad|>`` expanded to the image's merged token count."""

    def __init__(self, tokenizer, chat_template: str):
        from transformers import Qwen2VLImageProcessor

        self.tokenizer, self.chat_template = tokenizer, chat_template
        budget = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32}  # pixels: 8x8 patches of 4, 16 merged tokens
        self.image_processor = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, size=budget)

    def apply_chat_template(self, messages, **kw):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kw)

    def __call__(self, images, text, return_tensors="pt", **kw):
        out = self.image_processor([im for group in images for im in group], return_tensors="pt")
        pieces = text[0].split("<|image_pad|>")  # one prompt: its i-th placeholder becomes image i's merged tokens
        counts = (out["image_grid_thw"].prod(dim=-1) // 4).tolist()
        expanded = pieces[0] + "".join("<|image_pad|>" * c + p for c, p in zip(counts, pieces[1:], strict=True))
        ids = self.tokenizer([expanded], return_tensors=return_tensors, **kw)
        image = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        return {**ids, "mm_token_type_ids": (ids["input_ids"] == image).int(), "pixel_values": out["pixel_values"],
                "image_grid_thw": out["image_grid_thw"]}  # fmt: skip


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, tokenizer):
    """A tiny random-weight Qwen2-VL (M-RoPE; 16 image tokens for a 32x32-pixel budget) saved to a directory, and a
    processor for it."""
    from transformers import AutoTokenizer

    from tiny_vlms import qwen2_vl

    path = tmp_path_factory.mktemp("tiny-qwen2-vl")
    tokenizer.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    specials = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = tuple(tok.convert_tokens_to_ids(t) for t in specials)
    model, _ = qwen2_vl(vocab=len(tok), tokens=ids)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}{% if c.type == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return path, _QwenProcessor(tok, template)


def test_bench_on_qwen2_vl_with_m_rope_in_both_modes(qwen, tmp_path):
    from kvsieve.bench.runner import BenchConfig, Runner

    path, processor = qwen
    config = BenchConfig(model=str(path), tasks=["image_text", "image_needle"], methods=["full"], lengths=[256],
                         samples=1, mode="both", sequences=["none", "flowcut(keep=0.25)"],
                         out=str(tmp_path / "q"))  # fmt: skip
    rows = Runner(config, processor=processor).run()
    assert len(rows) == 2 * 2 * 2
    by = {(r["task"], r["mode"], r["sequence"]): r for r in rows}
    for task, images in (("image_text", 1), ("image_needle", 4)):
        for mode in ("agnostic", "aware"):
            full, cut = by[(task, mode, None)], by[(task, mode, "flowcut(keep=0.25)")]
            assert full["images"] == images and full["image_tokens"] == 16 * images
            assert full["kv_tokens"] == full["context_tokens"]
            assert cut["kv_tokens"] == full["context_tokens"] - 12 * images

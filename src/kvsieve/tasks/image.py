"""Image tasks for vision-language models, drawn locally with Pillow from a seed (no downloads).

Every sample records, in ``meta["scene"]``, everything drawn (texts, shapes, colours, boxes); :meth:`ImageTask.images`
renders the sample's images from it, deterministically, so a sample stays a small JSON record and the bench feeds the
same pixels every run. ``length`` is the side of each image in pixels (``--lengths 448``: 448 x 448 images; the
needle task's images are half that side), so the length axis of the bench sets how many image tokens a model whose
token count follows the resolution (Qwen2-VL, LLaVA-NeXT, Idefics3) receives.

Tasks:

* ``image_text``: read a number or a word drawn in the image, among a few distractor shapes;
* ``image_objects``: colour, shape, count or position of drawn objects (one question kind per sample);
* ``image_needle``: several images in one prompt, only one of which shows a number (the needle), to read;
* ``image_document``: a document page of key-value lines, one value asked.

Scoring as the text tasks: RULER's ``string_match_all`` of the answer in the model's output.
"""

from __future__ import annotations

import random
from functools import cache
from typing import Any, ClassVar

from kvsieve.tasks.base import Sample, Task, TaskError, count_tokens, sample_rng
from kvsieve.tasks.words import ADJECTIVES, NOUNS

__all__ = ["COLOURS", "ImageDocumentTask", "ImageNeedleTask", "ImageObjectsTask", "ImageTask", "ImageTextTask"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (240, 200, 20),
    "purple": (140, 50, 170), "orange": (245, 130, 20), "black": (20, 20, 20),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)
INK = (15, 15, 15)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
DOCUMENT_KEYS = (
    "invoice number", "customer id", "order code", "account number", "reference code", "postal code", "room number",
    "ticket number", "serial number", "batch code", "member id", "flight code",
)  # fmt: skip
MIN_SIDE = 64


@cache
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's embedded FreeType font: the same glyphs on every machine


def draw_text(image, text: str, xy: tuple[int, int], size: int, fill=INK) -> None:
    from PIL import ImageDraw

    ImageDraw.Draw(image).text(xy, text, font=_font(size), fill=fill)


def text_box(text: str, size: int) -> tuple[int, int, int, int]:
    """The pixel box ``text`` covers when drawn at (0, 0) with the task font of ``size``."""
    return tuple(int(v) for v in _font(size).getbbox(text))  # type: ignore[return-value]


def draw_shape(image, shape: str, box: tuple[int, int, int, int], colour: str) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render_scene(scene: dict[str, Any]):
    """One image from a scene record: ``side``, ``background``, ``shapes`` [(shape, box, colour)], ``texts``
    [(text, (x, y), size)], ``lines`` of a document [(text, (x, y), size)]."""
    from PIL import Image

    image = Image.new("RGB", (scene["side"], scene["side"]), tuple(scene.get("background", BACKGROUND)))
    for shape, box, colour in scene.get("shapes", []):
        draw_shape(image, shape, tuple(box), colour)
    for text, xy, size in scene.get("texts", []):
        draw_text(image, text, tuple(xy), size)
    return image


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _place_text(rng: random.Random, text: str, side: int, size: int) -> tuple[int, int]:
    """A random spot where ``text`` fits inside the image with a margin."""
    x0, y0, x1, y1 = text_box(text, size)
    margin = side // 16
    room_x, room_y = side - (x1 - x0) - 2 * margin, side - (y1 - y0) - 2 * margin
    if room_x < 0 or room_y < 0:
        raise TaskError(f"an image of {side} px is too small for the text {text!r}; use a larger --lengths")
    return margin + rng.randrange(room_x + 1) - x0, margin + rng.randrange(room_y + 1) - y0


def _cells(side: int, grid: int) -> list[tuple[int, int, int, int]]:
    """The boxes of a ``grid`` x ``grid`` layout (row-major), each shrunk so shapes never touch."""
    step = side // grid
    pad = step // 6
    return [(c * step + pad, r * step + pad, (c + 1) * step - pad, (r + 1) * step - pad)
            for r in range(grid) for c in range(grid)]  # fmt: skip


def _distractor_shapes(rng: random.Random, side: int, avoid: tuple[int, int, int, int], n: int) -> list:
    """Up to ``n`` shapes in random cells of a 4x4 grid, none overlapping ``avoid`` (a text's box)."""
    out = []
    cells = [c for c in _cells(side, 4) if not _overlap(c, avoid)]
    rng.shuffle(cells)
    for box in cells[:n]:
        out.append((rng.choice(SHAPES), box, rng.choice(list(COLOURS))))
    return out


def _overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


class ImageTask(Task):
    """A task whose samples come with images: ``images(sample)`` renders them; the prompt's text is the question.

    The sample's ``context`` is an instruction shown with the images (the images come first in the user turn, then the
    context text, then the question); ``n_tokens`` counts that text only (image tokens depend on the model).
    """

    default_haystack: ClassVar[str | None] = None
    uses_depth: ClassVar[bool] = False
    max_new_tokens = 16
    images_per_sample: ClassVar[int] = 1

    def images(self, sample: Sample) -> list:
        """The sample's images (PIL), rendered from ``sample.meta["scenes"]``."""
        return [render_scene(s) for s in sample.meta["scenes"]]

    def draw(self, rng: random.Random, side: int) -> tuple[list[dict], str, str, list[str], str, dict]:
        """(scenes, context, question, answers, answer prefix, extra meta) of one sample."""
        raise NotImplementedError

    def _generate_one(
        self, tokenizer: Any, length: int, seed: int, index: int, depth: float | None, haystack: str | None
    ) -> Sample:
        if length < MIN_SIDE:
            raise TaskError(f"{self.name}: length is the image side in pixels; use at least {MIN_SIDE}")
        rng = sample_rng(self.name, seed, index)
        scenes, context, question, answers, prefix, meta = self.draw(rng, length)
        return Sample(
            task=self.name,
            context=context,
            question=question,
            answers=answers,
            answer_prefix=prefix,
            max_new_tokens=self.max_new_tokens,
            length=length,
            n_tokens=count_tokens(tokenizer, context + question),
            depth=None,
            seed=seed,
            index=index,
            meta={"scenes": scenes, "image_side": length, **meta},
        )


class ImageTextTask(ImageTask):
    name = "image_text"
    description = "Read a number or a word drawn in an image, among distractor shapes."

    def draw(self, rng, side):
        kind = rng.choice(("number", "word"))
        value = _number(rng, rng.randint(4, 6)) if kind == "number" else rng.choice(NOUNS)
        size = max(10, side // 8)
        xy = _place_text(rng, value, side, size)
        x0, y0, x1, y1 = text_box(value, size)
        box = (xy[0] + x0, xy[1] + y0, xy[0] + x1, xy[1] + y1)
        scene = {"side": side, "texts": [(value, xy, size)], "shapes": _distractor_shapes(rng, side, box, 3),
                 "text_box": box}  # fmt: skip
        question = f"What {kind} is written in the image? Answer with the {kind} only."
        return [scene], "", question, [value], f"The {kind} is", {"kind": kind}


class ImageObjectsTask(ImageTask):
    name = "image_objects"
    description = "Colour, shape, count or position of coloured shapes drawn in an image."
    kinds: ClassVar[tuple[str, ...]] = ("colour", "shape", "count", "position")

    def draw(self, rng, side):
        kind = rng.choice(self.kinds)
        cells = _cells(side, 4)
        # cell i of the 4x4 grid is in quadrant (row // 2) * 2 + (column // 2)
        quadrant_cells = {q: [i for i in range(16) if (i // 8) * 2 + (i % 4) // 2 == k]
                          for k, q in enumerate(QUADRANTS)}  # fmt: skip
        colours = list(COLOURS)
        if kind == "count":
            colour, shape = rng.choice(colours), rng.choice(SHAPES)
            n = rng.randint(1, 6)
            picks = rng.sample(range(16), n + rng.randint(1, 4))
            objects = [(shape, cells[i], colour) for i in picks[:n]]
            for i in picks[n:]:  # distractors: another shape or another colour
                other = (rng.choice([s for s in SHAPES if s != shape]), colour) if rng.random() < 0.5 else \
                    (shape, rng.choice([c for c in colours if c != colour]))  # fmt: skip
                objects.append((other[0], cells[i], other[1]))
            question = f"How many {colour} {shape}s are in the image? Answer with a digit."
            return self._out(side, objects, kind, "", question, [str(n)], "The number is")
        # every object a different colour and shape pair; the asked one is unique in what the question names
        n = rng.randint(2, 4)
        pairs = rng.sample([(s, c) for s in SHAPES for c in colours], len(SHAPES) * len(colours))
        chosen: list[tuple[str, str]] = []
        for s, c in pairs:  # unique shapes and colours, so "the red object" and "the circle" each name one object
            if all(s != s2 and c != c2 for s2, c2 in chosen):
                chosen.append((s, c))
            if len(chosen) == n:
                break
        n = len(chosen)
        quads = rng.sample(QUADRANTS, n)
        objects = [(s, cells[rng.choice(quadrant_cells[q])], c) for (s, c), q in zip(chosen, quads, strict=True)]
        target, quad = chosen[0], quads[0]
        if kind == "colour":
            question = f"What colour is the {target[0]} in the image? Answer with one word."
            answer, prefix = target[1], "The colour is"
        elif kind == "shape":
            question = f"What shape is the {target[1]} object in the image? Answer with one word."
            answer, prefix = target[0], "The shape is"
        else:
            question = (f"In which quarter of the image is the {target[1]} {target[0]}? Answer with two words: top or "
                        "bottom, then left or right.")  # fmt: skip
            answer, prefix = quad, "It is in the"
        return self._out(side, objects, kind, "", question, [answer], prefix)

    @staticmethod
    def _out(side, objects, kind, context, question, answers, prefix):
        scene = {"side": side, "shapes": [(s, list(b), c) for s, b, c in objects]}
        return [scene], context, question, answers, prefix, {"kind": kind}


class ImageNeedleTask(ImageTask):
    name = "image_needle"
    description = "Several images in one prompt; one shows a number (the needle) to read, the others only shapes."
    images_per_sample = 4

    def draw(self, rng, side):
        small = max(MIN_SIDE, side // 2)
        value = _number(rng, 5)
        needle = rng.randrange(self.images_per_sample)
        scenes = []
        for i in range(self.images_per_sample):
            scene: dict[str, Any] = {"side": small}
            if i == needle:
                size = max(10, small // 6)
                xy = _place_text(rng, value, small, size)
                scene["texts"] = [(value, xy, size)]
                x0, y0, x1, y1 = text_box(value, size)
                box = (xy[0] + x0, xy[1] + y0, xy[0] + x1, xy[1] + y1)
                scene["shapes"] = _distractor_shapes(rng, small, box, 2)
            else:
                scene["shapes"] = _distractor_shapes(rng, small, (0, 0, 0, 0), 4)
            scenes.append(scene)
        context = f"Here are {self.images_per_sample} images. "
        question = "Exactly one of the images shows a number. What is that number? Answer with the number only."
        return scenes, context, question, [value], "The number is", {"needle_image": needle}


class ImageDocumentTask(ImageTask):
    name = "image_document"
    description = "A document page of key-value lines; read the value of one key."
    lines = 8

    def draw(self, rng, side):
        keys = rng.sample(DOCUMENT_KEYS, self.lines)
        values: list[str] = []
        while len(values) < len(keys):  # no value inside another, so the asked one is found only where it is
            v = _number(rng, rng.randint(5, 7))
            if all(v not in w and w not in v for w in values):
                values.append(v)
        size = max(8, side // (2 * self.lines + 4))
        margin = side // 12
        title = f"{rng.choice(ADJECTIVES).title()} {rng.choice(NOUNS).title()} Ltd."
        texts = [(title, (margin, margin), int(size * 1.4))]
        step = (side - 3 * margin) // (self.lines + 1)
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            line = f"{k.capitalize()}: {v}"
            if text_box(line, size)[2] > side - 2 * margin:
                raise TaskError(f"an image of {side} px is too small for the document; use a larger --lengths")
            texts.append((line, (margin, 2 * margin + (i + 1) * step), size))
        asked = rng.randrange(self.lines)
        scene = {"side": side, "background": (255, 255, 255), "texts": texts}
        question = f"According to the document, what is the {keys[asked]}? Answer with the value only."
        return [scene], "", question, [values[asked]], f"The {keys[asked]} is", {"key": keys[asked]}


IMAGE_TASKS: list[ImageTask] = [ImageTextTask(), ImageObjectsTask(), ImageNeedleTask(), ImageDocumentTask()]

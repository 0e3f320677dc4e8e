"""transformers Pipelines over a loaded `LadderModel` (`model.pipeline()`), one per task that fits a kind:
text-classification, image-classification, visual-question-answering and text2text-generation. They are real
`transformers.Pipeline` subclasses (device placement, no_grad, datasets and generators as inputs), with the
outputs of the transformers pipelines of the same names. One difference: a list input is labelled in one call
through the model's own length-bucketed batching (`model.logits`, as `lst predict` does), so labels are those
`predict` gives; transformers' `batch_size` padding collator is not used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Pipeline

from featcache.errors import LstError, expected

if TYPE_CHECKING:
    from .pretrained import LadderModel


class LabelPipeline(Pipeline):
    """Scores every label of one example (preprocess keeps the raw example: the model preprocesses as `predict`
    does) and returns the top_k {"label", "score"} dicts, best first."""

    default_top_k: int | None = None  # None: the best label alone, as a dict

    def __init__(self, model: LadderModel, task: str, **kwargs: Any) -> None:
        super().__init__(model=model, tokenizer=getattr(model, "tokenizer", None), task=task, device=model.device,
                         **kwargs)

    def _sanitize_parameters(self, top_k: int | None = None, **kwargs: Any):
        return {}, {}, ({"top_k": top_k} if top_k is not None else {})

    def preprocess(self, inputs: Any, **_: Any) -> dict[str, Any]:
        return {"examples": [inputs]}

    def _forward(self, model_inputs: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {"scores": torch.from_numpy(self.model.logits(model_inputs["examples"]))}

    def postprocess(self, model_outputs: dict[str, Any], top_k: int | None = -1, **_: Any):
        top_k = self.default_top_k if top_k == -1 else top_k
        scores = model_outputs["scores"][0].float()
        if self.model.task["type"] == "regression":  # the score itself, labelled as `lst predict` prints it
            return {"label": f"{float(scores[0]):.4f}", "score": float(scores[0])}
        probs = torch.softmax(scores, dim=-1).numpy()
        order = np.argsort(-probs, kind="stable")[: len(probs) if top_k is None else max(1, top_k)]
        found = [self.entry(self.model.label_names[i], float(probs[i])) for i in order]
        return found[0] if top_k is None else found

    def entry(self, label: str, score: float) -> dict[str, Any]:
        return {"label": label, "score": score}

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any):
        if isinstance(inputs, list):  # all at once, through the model's own batching (see the module's note)
            batch_size = kwargs.pop("batch_size", None) or 32
            kwargs.pop("num_workers", None)
            _, _, post = self._sanitize_parameters(**kwargs)
            post = {**self._postprocess_params, **post}
            scores = torch.from_numpy(self.model.logits(inputs, batch_size))
            return [self.postprocess({"scores": row[None]}, **post) for row in scores]
        return super().__call__(inputs, *args, **kwargs)


class TextClassificationPipeline(LabelPipeline):
    """As transformers' text-classification: a text (or a (text, text) pair) -> [{"label", "score"}]; a list ->
    one dict per text; top_k=k -> the k best per text."""

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any):
        out = super().__call__(inputs, *args, **kwargs)
        return [out] if isinstance(out, dict) else out


class ImageClassificationPipeline(LabelPipeline):
    """As transformers' image-classification: an image (path, PIL image, bytes or array) -> the top_k (default 5)
    [{"label", "score"}]; a list -> one such list per image."""

    default_top_k = 5


class VisualQuestionAnsweringPipeline(LabelPipeline):
    """As transformers' visual-question-answering: pipe(image=..., question=...) or pipe({"image", "question"})
    -> the top_k (default 1) [{"answer", "score"}]; a list of such dicts or (image, question) rows -> one list
    per row."""

    default_top_k = 1

    def entry(self, label: str, score: float) -> dict[str, Any]:
        return {"answer": label, "score": score}

    def __call__(self, image: Any = None, question: str | None = None, **kwargs: Any):
        rows = image if question is None else {"image": image, "question": question}
        if isinstance(rows, list):
            rows = [(r["image"], r["question"]) if isinstance(r, dict) else r for r in rows]
        elif isinstance(rows, dict):
            rows = (rows["image"], rows["question"])
        return super().__call__(rows, **kwargs)


class Text2TextGenerationPipeline(Pipeline):
    """As transformers' text2text-generation: a text -> [{"generated_text"}] (greedy; max_new_tokens, default
    16); a list -> one dict per text."""

    def __init__(self, model: LadderModel, task: str, **kwargs: Any) -> None:
        super().__init__(model=model, tokenizer=getattr(model, "tokenizer", None), task=task, device=model.device,
                         **kwargs)

    def _sanitize_parameters(self, max_new_tokens: int | None = None, **kwargs: Any):
        return {}, ({"max_new_tokens": max_new_tokens} if max_new_tokens else {}), {}

    def preprocess(self, inputs: Any, **_: Any) -> dict[str, Any]:
        return {"examples": [inputs]}

    def _forward(self, model_inputs: dict[str, Any], max_new_tokens: int = 16, **_: Any) -> dict[str, Any]:
        return {"texts": self.model.generate_texts(model_inputs["examples"], max_new_tokens)}

    def postprocess(self, model_outputs: dict[str, Any], **_: Any) -> list[dict[str, str]]:
        return [{"generated_text": t} for t in model_outputs["texts"]]

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any):
        if isinstance(inputs, list):
            batch_size = kwargs.pop("batch_size", None) or 32
            max_new_tokens = kwargs.pop("max_new_tokens", None) or self._forward_params.get("max_new_tokens", 16)
            return [{"generated_text": t} for t in self.model.generate_texts(inputs, max_new_tokens, batch_size)]
        return super().__call__(inputs, *args, **kwargs)


PIPELINES: dict[str, type[Pipeline]] = {
    "text-classification": TextClassificationPipeline,
    "image-classification": ImageClassificationPipeline,
    "visual-question-answering": VisualQuestionAnsweringPipeline,
    "text2text-generation": Text2TextGenerationPipeline,
}


def ladder_pipeline(model: LadderModel, task: str, **kwargs: Any) -> Pipeline:
    """The Pipeline of `task` over `model`, refused in one line for a task its kind does not do."""
    if task not in model.pipeline_tasks:
        raise LstError(expected(f"a task a {model.kind} run does ({', '.join(model.pipeline_tasks)})", f"'{task}'"))
    return PIPELINES[task](model, task, **kwargs)

r"""Image rewards: ``reward_fn(images [B, 3, H, W] in [0, 1] fp32, prompts: list[str]) -> [B]``.

This is the hook a ``PipelineTask`` calls on decoded previews and final samples, so any reward model
you have loaded plugs in (PickScore, HPS, ImageReward, an aesthetic predictor, ...). Nothing is
downloaded: you load the model from a local folder. Two are built in:

- ``JpegCompressibility``: r = -(size of the image as a JPEG at ``quality``, in kB), DDPO's
  compressibility reward; no model, deterministic, so it serves the tests and the tiny notebook;
- ``ClipReward``: s = logit_scale * cos(E_img(x), E_txt(prompt)) with a ``transformers`` ``CLIPModel``,
  which is how PickScore scores (PickScore is a CLIP-H/14 fine-tuned on human preferences):
  ``ClipReward.from_pretrained("/path/to/PickScore_v1", "/path/to/CLIP-ViT-H-14-laion2B")``.

A reward may return anything convertible to a float tensor ``[B]``; the task moves it to the
latents' device. Give it a ``name`` attribute to have it recorded in histories.
"""
from __future__ import annotations

import io

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class JpegCompressibility:
    """r = -kB of the RGB image saved as a JPEG (DDPO's compressibility; higher = simpler image)."""

    def __init__(self, quality: int = 95):
        if not 1 <= quality <= 100:
            raise ValueError(f"quality={quality} must be in [1, 100]")
        self.quality = quality
        self.name = f"jpeg_compressibility_q{quality}"

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        from PIL import Image

        check_images(images)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(array, "RGB").save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000.0)
        return -torch.tensor(sizes, dtype=torch.float32)


class ClipReward:
    """CLIP-style preference score (PickScore): ``logit_scale.exp() * <e_img, e_txt>`` of unit embeddings.

    Images are resized (bicubic, antialiased; no centre crop, as the pipeline's images are square) to ``image_size`` and normalised with CLIP's mean and std in torch,
    prompts tokenised with ``tokenizer`` (padded to its maximum length)."""

    name = "clip_reward"

    def __init__(self, model, tokenizer, image_size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size or model.config.vision_config.image_size
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, model_path: str, tokenizer_path: str | None = None, device="cpu", dtype=None) -> "ClipReward":
        """From local folders: a ``CLIPModel`` (e.g. PickScore_v1) and its tokenizer (the CLIP-H processor's)."""
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(model_path, local_files_only=True, torch_dtype=dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(tokenizer_path or model_path, local_files_only=True))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        check_images(images)
        device, dtype = next(self.model.parameters()).device, next(self.model.parameters()).dtype
        x = torch.nn.functional.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1)
        x = ((x - self.mean.to(x.device)) / self.std.to(x.device)).to(device, dtype)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt").to(device)
        e_img = _features(self.model.get_image_features(pixel_values=x))
        e_txt = _features(self.model.get_text_features(**tokens))
        e_img, e_txt = (torch.nn.functional.normalize(e.float(), dim=-1) for e in (e_img, e_txt))
        return (self.model.logit_scale.exp().float() * (e_img * e_txt).sum(-1)).cpu()


def _features(out):
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"an image reward takes RGB images [B, 3, H, W] in [0, 1], got {tuple(getattr(images, 'shape', ()))}")

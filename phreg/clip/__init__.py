"""The CLIP family's other half: the text tower (open_clip) and zero-shot segmentation.

The image tower is a timm model like any other (a whole OpenAI / open_clip checkpoint goes through timm's own key
conversion: `model.checkpoint` may simply be that file). The text tower and its tokenizer come from open_clip_torch
(`text.py`); zero-shot segmentation follows NACLIP / PH-Reg (`segmenter.py`), over a folder in `segment.py`.
"""

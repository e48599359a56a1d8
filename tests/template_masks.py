"""Token masks and attention statistics rebuilt by hand, for the trainer tests.

A second reading of Qwen2.5-VL's chat template, written without `avar_ops.hf.token_groups`: one Python loop per
sequence over its `<|im_start|>ROLE\\n … <|im_end|>` turns, the role read by decoding the header tokens. The
statistics (r_visual, the prompt's VAS, the AGTO terms) are computed from eager attention maps over these masks.
A trainer that takes the wrong mask, or combines the terms wrongly, therefore cannot agree with itself here.
"""

import torch

VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>")
PADS = ("<|image_pad|>", "<|video_pad|>")


def _ids(tokenizer, names):
    return {int(tokenizer.convert_tokens_to_ids(n)) for n in names}


def template_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor, processor) -> dict:
    """bool [B, L] masks "user" (user-turn content without vision markers and pads), "image" (pads), "system"
    (the whole system turn, its markers included) of each sequence, padding excluded."""
    tok = getattr(processor, "tokenizer", processor)
    im_start = int(tok.convert_tokens_to_ids("<|im_start|>"))
    im_end = int(tok.convert_tokens_to_ids("<|im_end|>"))
    pads, markers = _ids(tok, PADS), _ids(tok, VISION_MARKERS)
    B, L = input_ids.shape
    out = {k: torch.zeros(B, L, dtype=torch.bool) for k in ("user", "image", "system")}
    for b in range(B):
        ids = input_ids[b].tolist()
        valid = attention_mask[b].bool().tolist()
        for i in range(L):
            if valid[i] and ids[i] in pads:
                out["image"][b, i] = True
        i = 0
        while i < L:
            if not (valid[i] and ids[i] == im_start):
                i += 1
                continue
            # The header: the tokens after <|im_start|> up to and including the one that holds the newline.
            header, j = "", i + 1
            while j < L and "\n" not in header:
                header += tok.decode([ids[j]])
                j += 1
            role = header.split("\n")[0].strip()
            end = j
            while end < L and ids[end] != im_end:
                end += 1
            if role == "system":
                for k in range(i, min(end + 1, L)):
                    out["system"][b, k] = ids[k] not in pads
            elif role == "user":
                for k in range(j, end):
                    out["user"][b, k] = ids[k] not in pads and ids[k] not in markers
            i = end + 1
    return out


def first_eos_mask(completion_ids: torch.Tensor, eos_ids) -> torch.Tensor:
    """bool [N, C]: each completion's tokens up to and including its first end-of-sequence token."""
    N, C = completion_ids.shape
    mask = torch.zeros(N, C, dtype=torch.bool)
    for n in range(N):
        for c in range(C):
            mask[n, c] = True
            if int(completion_ids[n, c]) in eos_ids:
                break
    return mask


def map_masses(attentions, key_masks: dict) -> dict:
    """Per layer float64 [N, H, L] masses of each named key set: Σ_{k in set} P_qk from eager maps [N, H, L, L]."""
    return {
        name: [a.double() @ keys.double()[:, None, :, None] for a in attentions]  # each [N, H, L, 1]
        for name, keys in key_masks.items()
    }


def r_visual_from_maps(attentions, image_keys, system_keys, response, eps):
    """float64 [N]: mean over response tokens and layers of the head-mean image / (head-mean system + eps)."""
    m = map_masses(attentions, {"img": image_keys, "sys": system_keys})
    per_layer = [i[..., 0].mean(1) / (s[..., 0].mean(1) + eps) for i, s in zip(m["img"], m["sys"])]  # [N, L] each
    per_token = torch.stack(per_layer).mean(0)  # [N, L]
    r = response.double()  # [N, L]
    return (per_token * r).sum(-1) / r.sum(-1)


def response_image_mass_from_maps(attentions, image_keys, response):
    """float64 [N]: mean over response tokens, layers and heads of the image mass."""
    m = map_masses(attentions, {"img": image_keys})["img"]
    per_token = torch.stack([x[..., 0].mean(1) for x in m]).mean(0)  # [N, L]
    r = response.double()
    return (per_token * r).sum(-1) / r.sum(-1)


def vas_from_maps(attentions, image_keys, system_keys, queries, eps):
    """float64 [N]: mean over layers, user tokens and heads of image / (system + eps), per head."""
    m = map_masses(attentions, {"img": image_keys, "sys": system_keys})
    per_layer = [(i[..., 0] / (s[..., 0] + eps)).mean(1) for i, s in zip(m["img"], m["sys"])]  # [N, L] each
    per_token = torch.stack(per_layer).mean(0)  # [N, L]
    q = queries.double()
    return (per_token * q).sum(-1) / q.sum(-1)


def agto_from_maps(attentions, image_keys, system_keys, queries, eps):
    """(L_enhance_img, L_suppress_sys) float64 scalars from eager maps: per sample and (layer, head) the log of
    the mean attention per (user query, key) pair of the set, enhance with a minus sign, suppress with a plus;
    the mean over layers and heads, then over samples."""
    m = map_masses(attentions, {"img": image_keys, "sys": system_keys})
    q = queries.double()  # [B, L]
    nq = q.sum(-1)  # [B]

    def term(masses, keys):
        pairs = (nq * keys.double().sum(-1))[:, None]  # [B, 1]
        per_lh = [torch.log((x[..., 0] * q[:, None]).sum(-1) / pairs + eps) for x in masses]  # [B, H] each
        return torch.stack(per_lh).mean(dim=(0, 2))  # [B]

    return -term(m["img"], image_keys).mean(), term(m["sys"], system_keys).mean()

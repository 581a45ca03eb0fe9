import pytest
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import generate_masks_with_special_tokens_and_transfer_map

from ardetect.model.text import phrase_masks, tokenize_prompts

PROMPT = "A charcoal sketch of a V* cat sitting on a rock."
CONCEPT = "V* cat"


@pytest.fixture(scope="module")
def tokenizer(nano):
    return nano.tokenizer


def test_phrase_masks_match_groundingdino_rule():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([101, 102, 1012, 1029])
    for _ in range(20):
        ids = torch.randint(2000, 2010, (3, 12), generator=g)
        ids[torch.rand(3, 12, generator=g) < 0.3] = 1012
        ids[:, 0] = 101
        ids[0, -1] = 102
        ids[1, 7] = 102
        ids[1, 8:] = 0
        want_mask, want_pos = generate_masks_with_special_tokens_and_transfer_map(ids, special)
        mask, pos = phrase_masks(torch.isin(ids, special))
        assert torch.equal(mask, want_mask) and torch.equal(pos, want_pos)


def test_region_token_follows_concept_words(tokenizer):
    tok = tokenize_prompts(tokenizer, [PROMPT], [CONCEPT], 1, 64)
    ids = tok.input_ids[0].tolist()
    concept_ids = tokenizer(CONCEPT, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(concept_ids)] == concept_ids)
    stop = start + len(concept_ids)
    L = len(ids)
    # detector sequence: text[:stop], region token (index L), text[stop:]
    assert tok.gather_index[0].tolist() == list(range(stop)) + [L] + list(range(stop, L))
    assert tok.region_mask[0].nonzero().flatten().tolist() == [stop]
    assert tok.concept_mask[0].nonzero().flatten().tolist() == list(range(start, stop + 1))
    # position ids continue through the region token
    pos = tok.position_ids[0]
    assert pos[stop].item() == pos[stop - 1].item() + 1 and pos[stop + 1].item() == pos[stop].item() + 1


def test_region_token_attends_only_within_its_phrase(tokenizer):
    prompts = ["a photo of a V* mug. a wooden table.", "a V* mug."]
    tok = tokenize_prompts(tokenizer, prompts, ["V* mug", "V* mug"], 1, 64)
    ids = tokenizer(prompts[0])["input_ids"]
    period = tokenizer.convert_tokens_to_ids(".")
    first_period = ids.index(period)
    r = tok.region_mask[0].nonzero().item()
    row = tok.self_attn_mask[0, r]
    # the first phrase spans text tokens 1..first_period, plus the region token: all after [CLS]
    allowed = set(range(1, first_period + 2))  # +1 for the inserted region token
    assert set(row.nonzero().flatten().tolist()) == allowed
    assert not row[0] and not row[first_period + 2 :].any()
    # symmetric: the phrase's words attend to the region token, the other phrase does not
    assert tok.self_attn_mask[0, 1, r] and not tok.self_attn_mask[0, first_period + 2, r]


def test_padding_is_masked(tokenizer):
    prompts = [PROMPT, "a V* cat."]
    tok = tokenize_prompts(tokenizer, prompts, ["V* cat", "V* cat"], 1, 64)
    n_real = len(tokenizer(prompts[1])["input_ids"]) + 1
    mask = tok.token_mask[1]
    assert mask[:n_real].all() and not mask[n_real:].any()
    pad = torch.arange(tok.token_mask.shape[1]) >= n_real
    # no real token attends to padding; padding attends to itself only
    assert not tok.self_attn_mask[1][~pad][:, pad].any()
    sub = tok.self_attn_mask[1][pad][:, pad]
    assert torch.equal(sub, torch.eye(int(pad.sum()), dtype=torch.bool))
    assert not tok.concept_mask[1][pad].any()
    assert tok.attention_mask[1].sum() == n_real - 1


def test_no_region_tokens_gives_plain_layout(tokenizer):
    tok = tokenize_prompts(tokenizer, [PROMPT], [CONCEPT], 0, 64)
    assert torch.equal(tok.gather_index[0], torch.arange(tok.input_ids.shape[1]))
    assert torch.equal(tok.self_attn_mask, tok.text_self_mask) and not tok.region_mask.any()


@pytest.mark.parametrize(
    "prompts, concepts, max_len, match",
    [
        ([""], ["V* cat"], 64, "empty"),
        (["   "], ["V* cat"], 64, "empty"),
        (["a photo of a dog."], ["V* cat"], 64, "does not contain"),
        (["a V* cat."], [""], 64, "empty"),
        (["a V* cafe\u0301 sign."], ["\u0301"], 64, "does not contain the concept phrase '\u0301' \\(the phrase has no tokens"),
        (["a V* cat " + "on a rock " * 30 + "."], ["V* cat"], 64, "max_text_len"),
        (PROMPT, [CONCEPT], 64, "sequence"),
        ([PROMPT, PROMPT], [CONCEPT], 64, "concept phrases"),
    ],
)
def test_bad_prompts_raise(tokenizer, prompts, concepts, max_len, match):
    with pytest.raises(ValueError, match=match):
        tokenize_prompts(tokenizer, prompts, concepts, 1, max_len)


def test_a_prompt_without_a_final_delimiter_is_closed_and_scores_the_same_alone_or_batched(nano):
    """GroundingDINO's phrase rule takes a phrase closed at the padded batch's last position as no phrase: "A photo of
    a V* cat" alone (closed by [SEP]) had its words attend only to themselves, and beside a longer prompt to each
    other. Closed with " ." as GroundingDINO's preprocessing does, the sample is the same in any batch."""
    tok = tokenize_prompts(nano.tokenizer, ["A photo of a V* cat"], ["V* cat"], 1, 64)
    assert tok.input_ids[0].tolist()[-2:] == nano.tokenizer.convert_tokens_to_ids([".", "[SEP]"])
    torch.manual_seed(0)
    qimg, qbox = torch.rand(3, 3, 64, 64), torch.tensor([[5.0, 6.0, 40.0, 50.0]] * 3)
    images = torch.rand(1, 3, 64, 64)
    prompts = ["A photo of a V* cat", "a very long prompt about a V* dog sitting on a rock beside the sea .", "x ."]
    with torch.no_grad():
        alone = nano.encode_query(qimg[:1], qbox[:1], prompts[:1], ["V* cat"])
        batch = nano.encode_query(qimg, qbox, prompts, ["V* cat", "V* dog", "x"])
        a = nano(images, alone)
        b = nano(images, batch.select([0]))
    assert torch.allclose(a.pred_logits, b.pred_logits[..., : a.pred_logits.shape[-1]], atol=1e-4)
    assert torch.allclose(a.pred_boxes, b.pred_boxes, atol=1e-5)


def test_closed_adds_a_delimiter_only_where_a_prompt_ends_in_none():
    from ardetect.model.text import closed

    assert closed("A photo of a V* cat") == "A photo of a V* cat ." and closed("Is it a V* cat?") == "Is it a V* cat?"
    assert closed("A V* cat.  ") == "A V* cat.  " and closed(PROMPT) == PROMPT  # every prompt of the worlds: unchanged


def test_without_concept_phrases_the_delimiters_are_not_scored(tokenizer):
    tok = tokenize_prompts(tokenizer, ["mug . cat . car ."], None, 0, 64)
    words = tokenizer.convert_ids_to_tokens(tok.input_ids[0].tolist())
    assert [w for w, m in zip(words, tok.concept_mask[0].tolist()) if m] == ["mug", "cat", "car"]

"""A small model that checks an LLM's caption against the instruction it answers, in attribute space.

The LLM of InstructAny2Pix writes the edited scene's caption; where it goes wrong it most often copies a colour the
instruction names onto an object the edit leaves alone, or misplaces an object of another input. `EditVerifier`
predicts, from the instruction's words and the attribute reads of its inputs (`MultimodalAdapter.read_attributes`),
a distribution over every attribute field of the result, and reads the same fields from a caption's words; their
agreement ranks the LLM's candidate answers (`InstructAny2PixPipeline`'s `edit_verifier_weight`).

Each output field is a *mixture of sources* of its class type — an input's read of a field, a class word of the
instruction, or the empty class — weighted by attention from that field's query token (a pointer network, Vinyals
et al. 2015). It copies classes instead of naming them, and it is trained with the classes renamed at random in every
example (`rename_classes`), so it cannot learn which shape goes with which colour: a combination never seen in
training is copied like any other.
"""

import math
import re
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


# Token kinds of `EditVerifier.encode`.
PAD, WORD, CLASS_WORD, MEDIUM = 0, 1, 2, 3
UNKNOWN_WORD_ID = 1  # word ids: 0 padding, 1 unknown, then `words`
TOKEN_PATTERN = re.compile(r"\[(image|audio)(\d+)\]|[a-z]+|[^\sa-z]")
WORD_PATTERN = re.compile(r"[a-z]+")
# Smallest probability a field's agreement is allowed, so one unreadable field cannot dominate a sum of logs.
AGREEMENT_FLOOR = 1e-6


def collect_words(texts: list[str], class_words: list[list[str]]) -> list[str]:
    """The sorted vocabulary of ``texts`` for `EditVerifier`'s ``words``: every token (lower-cased words and
    punctuation) that is neither a placeholder nor a class word."""
    names = {word for field in class_words for word in field}
    tokens = {m.group(0) for text in texts for m in TOKEN_PATTERN.finditer(text.lower()) if not m.group(1)}
    return sorted(tokens - names)


@dataclass
class EditVerifierInputs:
    """A batch encoded by `EditVerifier.encode` (all tensors on the CPU, in the batch's order).

    Attributes:
        token_kinds (`torch.LongTensor`): `(batch, max_words)`: `PAD`, `WORD`, `CLASS_WORD` or `MEDIUM`.
        word_ids (`torch.LongTensor`): `(batch, max_words)`: the word's id (`WORD`) or the medium's slot (`MEDIUM`).
        class_types (`torch.LongTensor`), class_ids (`torch.LongTensor`): `(batch, max_words)`: for `CLASS_WORD`
            tokens the class type and class the word names (0 elsewhere).
        reads (`torch.Tensor`): `(batch, num_media_slots, sum(num_classes))`: each input's attribute reads, every
            field's class probabilities concatenated (zeros for a slot without input).
        media_mask (`torch.BoolTensor`): `(batch, num_media_slots)`: which slots hold an input.
    """

    token_kinds: torch.LongTensor
    word_ids: torch.LongTensor
    class_types: torch.LongTensor
    class_ids: torch.LongTensor
    reads: torch.Tensor
    media_mask: torch.BoolTensor

    def select(self, index: torch.LongTensor | slice) -> "EditVerifierInputs":
        """The rows ``index`` of every tensor."""
        return EditVerifierInputs(**{name: value[index] for name, value in vars(self).items()})


class EditVerifier(ModelMixin, ConfigMixin):
    r"""
    Predicts the attribute fields of an edit's result from its instruction and the attribute reads of its inputs.

    Input tokens: the instruction's words (a class word — "red", "star" — is embedded as its class, a placeholder
    such as ``[image2]`` as its input's slot, any other word by its id), one token per input and attribute field
    (the read's class probabilities times the class embeddings, plus field and slot embeddings) and one query token
    per field. After a transformer encoder, each query points at the sources of its field's class type (see the
    module's docstring); the field's distribution is the attention-weighted mixture of theirs.

    Args:
        class_words (`list[list[str]]`):
            Per attribute field, the word of each class (``""`` for a class no word names, such as an empty slot),
            in the order of the attribute reader's classes (e.g. `AttributeHeads.class_names`). Fields with the same
            list share class embeddings (one *class type*, e.g. the three slots' shapes); ``""`` classes are never
            renamed.
        words (`list[str]`):
            The vocabulary of other words (lower case); any other word reads as unknown.
        max_images (`int`, *optional*, defaults to 4), max_audio (`int`, *optional*, defaults to 2):
            How many image and audio placeholders an instruction may reference.
        max_words (`int`, *optional*, defaults to 48):
            Longest instruction, in tokens (words, punctuation and placeholders).
        hidden_size (`int`, *optional*, defaults to 128), num_layers (`int`, *optional*, defaults to 3),
        num_heads (`int`, *optional*, defaults to 4), dropout (`float`, *optional*, defaults to 0.1):
            The transformer encoder's size (pre-norm `nn.TransformerEncoderLayer`s).
    """

    @register_to_config
    def __init__(
        self,
        class_words: list[list[str]],
        words: list[str],
        max_images: int = 4,
        max_audio: int = 2,
        max_words: int = 48,
        hidden_size: int = 128,
        num_layers: int = 3,
        num_heads: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__()
        if not isinstance(class_words, (list, tuple)) or not class_words or any(
            not isinstance(field, (list, tuple)) or len(field) < 2 or not all(isinstance(w, str) for w in field)
            for field in class_words
        ):
            raise ValueError(
                "`class_words` must be a non-empty list with, per attribute field, a list of at least 2 class words "
                f"(strings, '' for a class no word names), got {class_words!r}."
            )
        for field in class_words:
            named = [word for word in field if word]
            bad = [word for word in named if not WORD_PATTERN.fullmatch(word)]
            if bad or len(set(named)) != len(named):
                raise ValueError(
                    f"`class_words`: every class word must be one lower-case word ([a-z]+, as `tokenize` splits text) "
                    f"and appear once in its field; got {field!r}."
                )
        for name, value in (("max_images", max_images), ("max_audio", max_audio), ("max_words", max_words)):
            lowest = 0 if name == "max_audio" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"`{name}` must be an int >= {lowest}, got {value!r}.")
        types: list[tuple[str, ...]] = []
        for field in class_words:
            if tuple(field) not in types:
                types.append(tuple(field))
        self.field_types = [types.index(tuple(field)) for field in class_words]
        self.num_classes = [len(field) for field in class_words]
        self.type_sizes = [len(words_of_type) for words_of_type in types]
        self.class_of_word: dict[str, tuple[int, int]] = {}
        for t, words_of_type in enumerate(types):
            for c, word in enumerate(words_of_type):
                if not word:
                    continue
                if self.class_of_word.get(word, (t, c)) != (t, c):
                    raise ValueError(
                        f"`class_words`: the word {word!r} names classes of two different class types; a word must "
                        "name one class."
                    )
                self.class_of_word[word] = (t, c)
        overlap = sorted(set(words) & set(self.class_of_word))
        if overlap:
            raise ValueError(f"`words` must not hold class words (they are read as classes): {overlap}.")
        self.word_index = {word: i + 2 for i, word in enumerate(words)}
        self.media_slots = [("image", i) for i in range(1, max_images + 1)]
        self.media_slots += [("audio", i) for i in range(1, max_audio + 1)]
        self.slot_index = {slot: i for i, slot in enumerate(self.media_slots)}
        # Per class type, which classes `rename_classes` may permute (those a word names).
        self.renamable = [torch.tensor([bool(w) for w in words_of_type]) for words_of_type in types]

        d = hidden_size
        self.class_embeddings = nn.ParameterList([nn.Parameter(torch.randn(n, d) * 0.5) for n in self.type_sizes])
        self.word_embeddings = nn.Embedding(len(words) + 2, d, padding_idx=0)
        self.token_kind_embeddings = nn.Embedding(4, d)
        self.class_type_embeddings = nn.Embedding(len(types), d)
        self.slot_embeddings = nn.Embedding(len(self.media_slots), d)
        self.position_embeddings = nn.Parameter(torch.randn(max_words, d) * 0.02)
        self.field_embeddings = nn.Parameter(torch.randn(len(class_words), d) * 0.02)
        self.field_queries = nn.Parameter(torch.randn(len(class_words), d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, num_heads, 4 * d, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.query_proj = nn.Linear(d, d)
        self.key_proj = nn.Linear(d, d)
        self.empty_logit = nn.Linear(d, 1)

    # ------------------------------------------------------------------------------------------------ inputs
    def tokenize(self, text: str) -> list[tuple[int, int, int, int]]:
        """``(kind, word id or slot, class type, class)`` per token of ``text`` (lower-cased).

        Raises `ValueError` for a placeholder beyond ``max_images`` / ``max_audio`` or a text longer than
        ``max_words`` tokens.
        """
        tokens = []
        for match in TOKEN_PATTERN.finditer(text.lower()):
            if match.group(1):
                slot = (match.group(1), int(match.group(2)))
                if slot not in self.slot_index:
                    raise ValueError(
                        f"EditVerifier reads at most {self.config.max_images} images and {self.config.max_audio} "
                        f"audio clips; {match.group(0)!r} in {text!r} is beyond them."
                    )
                tokens.append((MEDIUM, self.slot_index[slot], 0, 0))
            elif match.group(0) in self.class_of_word:
                tokens.append((CLASS_WORD, 0) + self.class_of_word[match.group(0)])
            else:
                tokens.append((WORD, self.word_index.get(match.group(0), UNKNOWN_WORD_ID), 0, 0))
        if len(tokens) > self.config.max_words:
            raise ValueError(
                f"EditVerifier reads at most max_words={self.config.max_words} tokens; {text!r} has {len(tokens)}."
            )
        return tokens

    def encode(
        self, texts: list[str], media_reads: list[dict[tuple[str, int], torch.Tensor]] | None = None
    ) -> EditVerifierInputs:
        """Encodes instructions (or captions) and their inputs' reads.

        Args:
            texts (`list[str]`): instructions with their placeholders (``"[image1]: paint the red star blue"``), or
                captions (no placeholders, no inputs).
            media_reads (`list[dict]`, *optional*): per text, the attribute reads of each input it references, keyed
                by ``(kind, index)`` (``("image", 1)`` for ``[image1]``): a `(sum(num_classes),)` tensor of every
                field's class probabilities concatenated. Default: no inputs.

        Returns:
            [`EditVerifierInputs`]
        """
        media_reads = media_reads if media_reads is not None else [{} for _ in texts]
        if len(media_reads) != len(texts):
            raise ValueError(f"`media_reads` must have one entry per text: {len(media_reads)} for {len(texts)}.")
        batch, length, width = len(texts), self.config.max_words, sum(self.num_classes)
        ids = torch.zeros(4, batch, length, dtype=torch.long)
        reads = torch.zeros(batch, len(self.media_slots), width)
        mask = torch.zeros(batch, len(self.media_slots), dtype=torch.bool)
        for b, (text, row) in enumerate(zip(texts, media_reads)):
            tokens = self.tokenize(text)
            if tokens:
                ids[:, b, : len(tokens)] = torch.tensor(tokens).T
            for slot, read in row.items():
                if slot not in self.slot_index:
                    raise ValueError(f"`media_reads` key {slot!r} is not one of {self.media_slots}.")
                if read.shape != (width,):
                    raise ValueError(
                        f"`media_reads` of {slot} must have shape ({width},) (every field's class probabilities), "
                        f"got {tuple(read.shape)}."
                    )
                reads[b, self.slot_index[slot]] = read.float().cpu()
                mask[b, self.slot_index[slot]] = True
        return EditVerifierInputs(ids[0], ids[1], ids[2], ids[3], reads, mask)

    def rename_classes(
        self,
        inputs: EditVerifierInputs,
        labels: torch.LongTensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[EditVerifierInputs, torch.LongTensor | None]:
        """The training augmentation: per example and class type, a random permutation of the classes a word names,
        applied alike to the class words, every input's reads and the labels (a new batch; the inputs are kept).

        Args:
            inputs ([`EditVerifierInputs`]): a batch from `encode`.
            labels (`torch.LongTensor`, *optional*): `(batch, num_fields)` class labels to rename with them.
            generator (`torch.Generator`, *optional*): for the permutations.

        Returns:
            `tuple`: the renamed batch and labels.
        """
        batch = inputs.token_kinds.shape[0]
        perms = []
        for renamable in self.renamable:
            perm = torch.arange(len(renamable)).repeat(batch, 1)
            movable = renamable.nonzero()[:, 0]
            order = torch.rand(batch, len(movable), generator=generator).argsort(dim=1)
            perm[:, movable] = movable[order]
            perms.append(perm)  # perm[b, c]: the new class of class c
        class_ids = inputs.class_ids.clone()
        for t, perm in enumerate(perms):
            sel = (inputs.token_kinds == CLASS_WORD) & (inputs.class_types == t)
            class_ids[sel] = perm.gather(1, inputs.class_ids.clamp_max(len(self.renamable[t]) - 1))[sel]
        fields = []
        for f, read in enumerate(inputs.reads.split(self.num_classes, dim=-1)):
            perm = perms[self.field_types[f]][:, None, :].expand_as(read)
            fields.append(torch.zeros_like(read).scatter(-1, perm, read))  # new[perm[c]] = old[c]
        renamed = EditVerifierInputs(
            inputs.token_kinds, inputs.word_ids, inputs.class_types, class_ids, torch.cat(fields, -1), inputs.media_mask
        )
        if labels is not None:
            labels = torch.stack(
                [perms[t].gather(1, labels[:, f : f + 1])[:, 0] for f, t in enumerate(self.field_types)], dim=1
            )
        return renamed, labels

    # ------------------------------------------------------------------------------------------------ model
    def forward(self, inputs: EditVerifierInputs) -> list[torch.Tensor]:
        """Per field, the log-probabilities of its classes in the result, `(batch, num_classes[f])` each.

        Args:
            inputs ([`EditVerifierInputs`]): from `encode` (any device; moved to the model's).
        """
        device = self.position_embeddings.device
        inputs = EditVerifierInputs(**{name: value.to(device) for name, value in vars(inputs).items()})
        # Columns no row uses are dropped: a batch of one-image instructions costs one image's tokens.
        length = max(int((inputs.token_kinds != PAD).sum(1).max()), 1)
        kinds, word_ids = inputs.token_kinds[:, :length], inputs.word_ids[:, :length]
        class_types, class_ids = inputs.class_types[:, :length], inputs.class_ids[:, :length]
        used = inputs.media_mask.any(0)
        reads, media_mask, slots = inputs.reads[:, used], inputs.media_mask[:, used], used.nonzero()[:, 0]
        batch, num_slots, num_fields = kinds.shape[0], int(used.sum()), len(self.num_classes)
        d = self.config.hidden_size

        is_class = kinds == CLASS_WORD
        class_vectors = torch.zeros(batch, length, d, device=device, dtype=self.position_embeddings.dtype)
        for t, table in enumerate(self.class_embeddings):
            sel = is_class & (class_types == t)
            class_vectors[sel] = table[class_ids[sel]]
        word_vectors = self.word_embeddings(torch.where(kinds == WORD, word_ids, 0))
        slot_vectors = self.slot_embeddings(torch.where(kinds == MEDIUM, word_ids, 0)) * (kinds == MEDIUM)[..., None]
        type_vectors = self.class_type_embeddings(class_types) * is_class[..., None]
        tokens = word_vectors + slot_vectors + class_vectors + type_vectors + self.token_kind_embeddings(kinds)
        tokens = tokens + self.position_embeddings[:length]

        fields = reads.split(self.num_classes, dim=-1)
        field_vectors = torch.stack(
            [read.to(tokens.dtype) @ self.class_embeddings[self.field_types[f]] for f, read in enumerate(fields)], 2
        )
        field_vectors = field_vectors + self.field_embeddings + self.slot_embeddings(slots)[None, :, None]
        field_vectors = field_vectors.reshape(batch, num_slots * num_fields, d)
        queries = self.field_queries.expand(batch, -1, -1)
        media_padding = (~media_mask)[:, :, None].expand(-1, -1, num_fields).reshape(batch, -1)
        queries_padding = torch.zeros(batch, num_fields, dtype=torch.bool, device=device)
        padding = torch.cat([kinds == PAD, media_padding, queries_padding], 1)
        hidden = self.norm(self.encoder(torch.cat([tokens, field_vectors, queries], 1), src_key_padding_mask=padding))

        query_states, source_states = hidden[:, -num_fields:], hidden[:, : length + num_slots * num_fields]
        scores = self.query_proj(query_states) @ self.key_proj(source_states).transpose(1, 2) / math.sqrt(d)
        # The sources and their class distributions depend only on a field's class type: built once per type.
        field_of_source = torch.tensor(self.field_types, device=device).repeat(num_slots)
        sources = {}
        for t in sorted(set(self.field_types)):
            n = self.type_sizes[t]
            is_source = torch.cat([is_class & (class_types == t), (field_of_source == t)[None] & ~media_padding], 1)
            media_values = torch.zeros(batch, num_slots, num_fields, n, device=device, dtype=hidden.dtype)
            for g, read in enumerate(fields):
                if self.field_types[g] == t:
                    media_values[:, :, g] = read.to(hidden.dtype)
            word_values = nn.functional.one_hot(class_ids.clamp_max(n - 1), n).to(hidden.dtype)
            values = torch.cat([word_values, media_values.reshape(batch, -1, n)], 1)
            empty = ~self.renamable[t].to(device)
            if empty.any():  # a class no word names (an empty slot) is a source of its own
                values = torch.cat([values, (empty.to(hidden.dtype) / empty.sum()).expand(batch, 1, n)], 1)
            sources[t] = (is_source, values.float(), bool(empty.any()))
        out = []
        for f in range(num_fields):
            is_source, values, has_empty = sources[self.field_types[f]]
            logits = scores[:, f].masked_fill(~is_source, float("-inf"))
            if has_empty:
                logits = torch.cat([logits, self.empty_logit(query_states[:, f])], 1)
            weights = logits.float().softmax(-1).nan_to_num(0.0)  # a field with no source predicts nothing
            probs = (weights[:, None] @ values)[:, 0]
            out.append(probs.clamp_min(AGREEMENT_FLOOR).log())
        return out

    # ------------------------------------------------------------------------------------------------ use
    @torch.no_grad()
    def predict(
        self, texts: list[str], media_reads: list[dict[tuple[str, int], torch.Tensor]] | None = None
    ) -> list[torch.Tensor]:
        """Per field, the class probabilities `(len(texts), num_classes[f])` of each instruction's result (or, for a
        caption without inputs, of the scene it describes). Runs in eval mode; restores the training mode after."""
        was_training = self.training
        self.eval()
        try:
            return [log_probs.exp() for log_probs in self(self.encode(texts, media_reads))]
        finally:
            self.train(was_training)

    @staticmethod
    def agreement(predicted: list[torch.Tensor], read: list[torch.Tensor]) -> torch.Tensor:
        """Sum over fields of ``log Σ_c p(c) q(c)``: how well two per-field distributions agree (0 at best).

        Args:
            predicted (`list[torch.Tensor]`): per field `(n, classes)` or `(classes,)`, e.g. an instruction's result.
            read (`list[torch.Tensor]`): the same shapes (broadcast), e.g. its candidate captions.

        Returns:
            `torch.Tensor`: shape `(n,)` (or a scalar).
        """
        if len(predicted) != len(read):
            raise ValueError(f"`predicted` has {len(predicted)} fields but `read` has {len(read)}.")
        return sum(
            (p.float() * q.float().to(p.device)).sum(-1).clamp_min(AGREEMENT_FLOOR).log()
            for p, q in zip(predicted, read)
        )

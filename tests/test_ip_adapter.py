import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_any2pix.models.ip_adapter import (
    ImageBindIPAdapter,
    temporary_ip_adapter_scale,
    is_ip_adapter_attached,
    unet_cross_attention_hidden_sizes,
)


def tiny_unet(cross_attention_dim=16, block_out_channels=(8, 16)):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def random_adapter(unet, embed_dim=12):
    torch.manual_seed(1)
    adapter = ImageBindIPAdapter.from_unet(unet, image_embed_dim=embed_dim)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return adapter.eval()


def unet_inputs(batch=2, text_dim=16):
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor(10),
        torch.randn(batch, 5, text_dim, generator=g),
    )


def test_layout_is_the_standard_ip_adapter_layout():
    unet = tiny_unet()
    adapter = random_adapter(unet)
    hidden_sizes = unet_cross_attention_hidden_sizes(unet)
    # attn_processors order: down_blocks.0 (1 layer, 8 ch), up_blocks.1 (2 layers, 8 ch), mid_block (16 ch).
    assert hidden_sizes == [8, 8, 8, 16]
    sd = adapter.diffusers_state_dict()
    assert set(sd["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert sorted(sd["ip_adapter"]) == sorted(
        f"{i}.to_{kv}_ip.weight" for i in (1, 3, 5, 7) for kv in ("k", "v")
    )
    assert sd["image_proj"]["proj.weight"].shape == (4 * 16, 12)


def test_attached_adapter_matches_diffusers_load_ip_adapter_and_independent_tokens():
    unet = tiny_unet()
    reference = tiny_unet()
    adapter = random_adapter(unet)
    embeds = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    sample, t, text = unet_inputs()

    adapter.attach_to(unet)
    assert is_ip_adapter_attached(unet)
    # diffusers' own loader on an identical UNet, fed the same standard-layout dict.
    reference._load_ip_adapter_weights([adapter.diffusers_state_dict()], low_cpu_mem_usage=False)
    kwargs = {"added_cond_kwargs": {"image_embeds": [embeds[:, None, :]]}}
    with torch.no_grad():
        ours = unet(sample, t, text, **kwargs).sample
        theirs = reference(sample, t, text, **kwargs).sample
        tokens = unet.encoder_hid_proj([embeds[:, None, :]])[0]
    assert torch.equal(ours, theirs)
    # Independent computation of the image tokens: LayerNorm(reshape(proj(e), 4 x C)).
    w, b = adapter.image_proj.proj.weight, adapter.image_proj.proj.bias
    manual = torch.nn.functional.layer_norm(
        (embeds @ w.T + b).reshape(2, 4, 16), (16,), adapter.image_proj.norm.weight, adapter.image_proj.norm.bias
    )
    assert torch.allclose(tokens.reshape(2, 4, 16), manual, atol=1e-6)
    assert torch.allclose(adapter.image_tokens(embeds), manual, atol=1e-6)


def test_detach_restores_the_plain_unet_and_scale_never_leaks():
    unet = tiny_unet()
    sample, t, text = unet_inputs()
    with torch.no_grad():
        before = unet(sample, t, text).sample
    adapter = random_adapter(unet)
    restore = adapter.attach_to(unet)
    embeds = torch.randn(2, 1, 12)
    kwargs = {"added_cond_kwargs": {"image_embeds": [embeds]}}
    with torch.no_grad():
        full = unet(sample, t, text, **kwargs).sample
        with temporary_ip_adapter_scale(unet, 0.0):
            off = unet(sample, t, text, **kwargs).sample
        again = unet(sample, t, text, **kwargs).sample
    assert torch.allclose(off, before, atol=1e-6)  # scale 0 == no adapter
    assert not torch.allclose(full, before)
    assert torch.equal(full, again)  # the scale came back
    ImageBindIPAdapter.detach_from(unet, restore)
    assert not is_ip_adapter_attached(unet)
    assert unet.config.encoder_hid_dim_type is None
    with torch.no_grad():
        assert torch.equal(unet(sample, t, text).sample, before)


def test_scale_restored_on_exception():
    unet = tiny_unet()
    random_adapter(unet).attach_to(unet)
    with pytest.raises(RuntimeError):
        with temporary_ip_adapter_scale(unet, 0.3):
            raise RuntimeError("boom")
    scales = {s for p in unet.attn_processors.values() if hasattr(p, "scale") for s in p.scale}
    assert scales == {1.0}


def test_save_load_round_trip(tmp_path):
    unet = tiny_unet()
    adapter = random_adapter(unet)
    adapter.save_pretrained(tmp_path)
    loaded = ImageBindIPAdapter.from_pretrained(tmp_path)
    assert all(p.device.type != "meta" for p in loaded.parameters())
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_mismatched_unet_is_named():
    adapter = random_adapter(tiny_unet())
    with pytest.raises(ValueError, match=r"cross_attention_dim=16 but the unet has cross_attention_dim=24"):
        adapter.check_compatible(tiny_unet(cross_attention_dim=24))
    with pytest.raises(ValueError, match=r"hidden sizes \[8, 8, 8, 16\], but the unet's cross-attention processors have \[16, 16, 16, 32\]"):
        adapter.check_compatible(tiny_unet(block_out_channels=(16, 32)))
    with pytest.raises(ValueError, match=r"reads 12-d image embeddings but the image_encoder produces 32-d"):
        adapter.check_compatible(tiny_unet(), image_embed_dim=32)


def test_bad_configs():
    with pytest.raises(ValueError, match="num_tokens"):
        ImageBindIPAdapter(hidden_sizes=[8], num_tokens=16)
    with pytest.raises(ValueError, match="hidden_sizes"):
        ImageBindIPAdapter(hidden_sizes=[])


def test_attaching_over_an_attached_adapter_detaches_to_the_plain_unet():
    # A UNet reused from another pipeline's `components` already carries an adapter; detaching the second one must give
    # the plain UNet (what `InstructAny2PixPipeline.save_pretrained` writes), not the first adapter.
    unet = tiny_unet()
    plain_keys = set(unet.state_dict())
    sample, t, text = unet_inputs()
    with torch.no_grad():
        before = unet(sample, t, text).sample
    random_adapter(unet).attach_to(unet)  # the adapter the UNet came with
    restore = random_adapter(unet).attach_to(unet)
    assert set(unet.state_dict()) != plain_keys
    ImageBindIPAdapter.detach_from(unet, restore)
    assert not is_ip_adapter_attached(unet)
    assert unet.config.encoder_hid_dim_type is None and unet.encoder_hid_proj is None
    assert set(unet.state_dict()) == plain_keys
    with torch.no_grad():
        assert torch.equal(unet(sample, t, text).sample, before)

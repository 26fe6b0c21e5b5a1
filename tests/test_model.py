"""The model's structure, sizes, initialisation and fast paths, each against an independent computation."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masking
import vmae

# The reference models' parameter counts, in millions: encoder (with final norm), decoder (depth 4, with head),
# mask_token + encoder_to_decoder, pretraining total, classifier with 400 and 710 classes.
PARAMS_M = {
    "small": (21.88, 2.08, 0.07, 24.03, 22.03, 22.15),
    "base": (86.23, 7.69, 0.30, 94.21, 86.53, 86.77),
    "large": (303.86, 13.40, 0.52, 317.78, 304.27, 304.59),
    "huge": (631.61, 13.40, 0.66, 645.66, 632.12, 632.52),
    "giant": (1011.61, 13.97, 0.72, 1026.31, 1012.17, 1012.61),
}


def tiny(**overrides) -> vmae.VideoMAEConfig:
    sizes = dict(img_size=32, num_frames=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                 decoder_depth=1, decoder_num_heads=2)
    return vmae.config("small", **{**sizes, **overrides})


def count(module: nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


@pytest.mark.parametrize("size", list(PARAMS_M))
def test_parameter_counts(size):
    with torch.device("meta"):  # shapes only: a billion parameters cost nothing here
        cfg = vmae.config(size)
        model = vmae.PretrainVideoMAE(cfg)
        cls400, cls710 = vmae.VideoClassifier(cfg, 400), vmae.VideoClassifier(cfg, 710)
    bridge = round((model.mask_token.numel() + model.encoder_to_decoder.weight.numel()) / 1e6, 2)
    got = (count(model.encoder), count(model.decoder), bridge, count(model), count(cls400), count(cls710))
    assert got == PARAMS_M[size]


def test_base_classifier_exact_count():
    with torch.device("meta"):
        model = vmae.VideoClassifier(vmae.config("base"), 400)
    assert sum(p.numel() for p in model.parameters()) == 86534800  # a reference ViT-B K400 fine-tune log


def test_config_aliases_and_giant():
    assert vmae.config("pretrain_videomae_base_patch16_224") == vmae.config("base")
    assert vmae.config("vit_small_patch16_224") == vmae.config("small")
    g = vmae.config("vit_giant_patch14_224")
    assert (g.patch_size, g.embed_dim, g.depth, g.grid, g.cube_dim) == (14, 1408, 40, (8, 16, 16), 1176)
    assert int(g.embed_dim * g.mlp_ratio) == 6144 and int(g.decoder_embed_dim * g.mlp_ratio) == 2234


def test_config_overrides_and_errors():
    cfg = vmae.config("base", num_frames=32, img_size=112)
    assert cfg.grid == (16, 7, 7) and cfg.num_tokens == 784
    with pytest.raises(ValueError, match="decoder_dept"):
        vmae.config("base", decoder_dept=4)
    with pytest.raises(ValueError, match="unknown model 'bse'"):
        vmae.config("bse")
    with pytest.raises(ValueError, match="img_size=100 must be divisible by patch_size=16"):
        vmae.config("base", img_size=100)
    with pytest.raises(ValueError, match="num_frames=15"):
        vmae.config("base", num_frames=15)


def test_sincos_table_formula():
    n, d = 50, 12
    table = vmae.sincos_table(n, d)
    for pos in (0, 7, 49):
        for j in range(d):
            angle = pos / 10000 ** (2 * (j // 2) / d)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j].item() == pytest.approx(expected, abs=1e-6)
    assert torch.equal(vmae.sincos_table(2 * n, d)[:n], table)  # depends only on the flat index


def test_unpatchify_inverts_patchify():
    video = torch.randn(2, 3, 8, 28, 42)
    cubes = vmae.patchify(video, 14, 2)
    assert cubes.shape == (2, 4 * 2 * 3, 3, 2 * 14 * 14)
    assert torch.equal(vmae.unpatchify(cubes, (4, 2, 3), 14, 2), video)


def test_visible_only_embedding_equals_conv3d_with_gradients():
    cfg = tiny()
    embed = vmae.CubeEmbed(cfg)
    video = torch.randn(3, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    keep = masking.MaskConfig(cfg.grid, "tube", 0.75).draw(3).visible  # (B, N_vis)

    ours = embed(video, keep)
    ours.square().sum().backward()
    grads = [p.grad.clone() for p in embed.parameters()]
    embed.zero_grad()

    conv = embed.proj(video).flatten(2).transpose(1, 2)  # (B, N, D): the reference's path
    theirs = vmae.gather_tokens(conv, keep)
    theirs.square().sum().backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, embed.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-5)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(1)
    attn = vmae.Attention(16, 4)
    nn.init.normal_(attn.q_bias)
    nn.init.normal_(attn.v_bias)
    x = torch.randn(2, 7, 16)
    q, k, v = F.linear(x, attn.qkv.weight).chunk(3, dim=-1)
    q, v = q + attn.q_bias, v + attn.v_bias  # no bias on k
    heads = lambda t: t.view(2, 7, 4, 4).transpose(1, 2)  # noqa: E731
    weights = (heads(q) @ heads(k).transpose(-2, -1) / 2.0).softmax(dim=-1)  # scale 1/sqrt(4)
    expected = attn.proj((weights @ heads(v)).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_pretraining_init_follows_the_reference():
    cfg = vmae.config("base", depth=2)
    model = vmae.PretrainVideoMAE(cfg)
    token = model.mask_token
    assert token.abs().max() <= 0.02 and 0.008 < token.std() < 0.013  # normal truncated at ±1 sigma
    qkv = model.encoder.blocks[0].attn.qkv.weight  # xavier-uniform: U(±sqrt(6 / (fan_in + fan_out)))
    bound = math.sqrt(6 / (768 + 3 * 768))
    assert qkv.abs().max() <= bound and qkv.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    head = model.decoder.head.weight
    assert head.std().item() == pytest.approx(math.sqrt(6 / (384 + 1536)) / math.sqrt(3), rel=0.02)
    e2d = model.encoder_to_decoder.weight  # PyTorch's default Linear init: U(±1/sqrt(fan_in))
    assert e2d.abs().max() <= 1 / math.sqrt(768) and e2d.std().item() == pytest.approx(1 / math.sqrt(3 * 768), rel=0.03)
    conv = model.encoder.patch_embed.proj.weight  # PyTorch's default Conv3d init as well
    assert conv.abs().max() <= 1 / math.sqrt(3 * 2 * 16 * 16)
    block = model.decoder.blocks[0]
    assert (block.attn.q_bias == 0).all() and (block.mlp.fc1.bias == 0).all()
    assert (block.norm1.weight == 1).all() and (block.norm1.bias == 0).all()


def test_classifier_init_follows_the_reference():
    model = vmae.VideoClassifier(vmae.config("base", depth=2), 400, init_scale=0.001)
    assert model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.05)
    assert (model.head.bias == 0).all() and (model.fc_norm.weight == 1).all()
    assert not hasattr(model, "cls_token") and isinstance(model.norm, nn.Identity)


def test_forward_features_pools_all_tokens():
    cfg = tiny()
    model = vmae.VideoClassifier(cfg, 5).eval()
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    tokens, pooled = model.forward_features(video)
    assert tokens.shape == (2, cfg.num_tokens, cfg.embed_dim) and pooled.shape == (2, cfg.embed_dim)
    torch.testing.assert_close(pooled, model.fc_norm(tokens.mean(dim=1)))
    torch.testing.assert_close(model(video), model.head(pooled))


@pytest.mark.parametrize("frames,size,patch", [(8, 112, 14), (4, 48, 16), (6, 56, 14)])
def test_other_frame_counts_and_sizes(frames, size, patch):
    cfg = tiny(num_frames=frames, img_size=size, patch_size=patch)
    video = torch.randn(2, 3, frames, size, size)
    v1 = masking.MaskConfig(cfg.grid, "tube", 0.75, decoder_mask_ratio=0).draw(2)
    out = vmae.PretrainVideoMAE(cfg)(video, v1.visible, v1.queries)
    assert out.shape == (2, masking.num_hidden("tube", cfg.grid, 0.75), 3 * 2 * patch ** 2)
    if cfg.grid[1] % 2 == 0:
        dual = masking.MaskConfig(cfg.grid, "tube", 0.75, "run_cell", 0.5).draw(2)
        assert vmae.PretrainVideoMAE(cfg)(video, dual.visible, dual.queries).shape[1] == cfg.num_tokens // 2
    assert vmae.VideoClassifier(cfg, 3)(video).shape == (2, 3)


def test_wrong_input_shape_names_the_expected_one():
    cfg = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, 4, 32, 32\)"):
        vmae.VideoClassifier(cfg, 3)(torch.randn(1, 3, 8, 32, 32))


@pytest.mark.parametrize("tubelet", [1, 2, 4])
def test_target_layout_uses_the_real_tubelet(tubelet):
    """Build a video whose pixels say where they are, then read the target back by the stated layout:
    feature ((dt·p + dy)·p + dx)·3 + c of token (t', h', w')."""
    p, T, H = 4, 8, 8
    c, t, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (3, T, H, H)), indexing="ij")
    pixels = (c * 1000 + t * 100 + y * 10 + x)[None] / 4096  # (1, 3, T, H, W), in [0, 1)
    mean = torch.tensor(vmae.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(vmae.IMAGENET_STD).view(1, 3, 1, 1, 1)
    every = torch.arange((T // tubelet) * 4)[None]
    target = vmae.reconstruction_target((pixels - mean) / std, every, p, tubelet, normalize=False)
    assert target.shape == (1, (T // tubelet) * 4, 3 * tubelet * p * p)
    for token, (tt, hh, ww) in [(0, (0, 0, 0)), (5, (1, 0, 1)), ((T // tubelet) * 4 - 1, (T // tubelet - 1, 1, 1))]:
        for dt, dy, dx, ch in [(0, 0, 0, 0), (tubelet - 1, 3, 2, 1), (tubelet // 2, 1, 3, 2)]:
            feature = ((dt * p + dy) * p + dx) * 3 + ch
            where = (ch, tt * tubelet + dt, hh * p + dy, ww * p + dx)
            assert target[0, token, feature].item() == pytest.approx(pixels[(0, *where)].item(), abs=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_target_at_some_tokens_equals_those_rows_of_the_full_target(normalize):
    video = torch.randn(2, 3, 4, 32, 32)
    tokens = masking.MaskConfig((2, 2, 2), "random", 0.5).draw(2).visible
    full = vmae.reconstruction_target(video, torch.arange(8).expand(2, 8), 16, 2, normalize)
    torch.testing.assert_close(vmae.reconstruction_target(video, tokens, 16, 2, normalize),
                               vmae.gather_tokens(full, tokens), atol=0, rtol=0)


def test_normalised_target_is_per_cube_per_channel():
    video = torch.randn(2, 3, 4, 16, 16)
    target = vmae.reconstruction_target(video, torch.arange(8).expand(2, 8), 8, 2).unflatten(-1, (-1, 3))
    torch.testing.assert_close(target.mean(dim=2), torch.zeros(2, 8, 3), atol=1e-5, rtol=0)  # (B, N, 2·8·8, 3)
    torch.testing.assert_close(target.std(dim=2), torch.ones(2, 8, 3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dual", [True, False])
def test_loss_equals_a_per_sample_loop(dual):
    cfg = tiny()
    B, N, F_ = 3, cfg.num_tokens, cfg.cube_dim
    drawn = masking.MaskConfig(cfg.grid, "tube", 0.75, "run_cell", 0.5 if dual else 0).draw(B)
    enc = drawn.encoder
    queries = ~drawn.decoder if dual else enc  # where the decoder predicts
    pred, target = torch.randn(B, drawn.queries.shape[1], F_), torch.randn(B, N, F_)
    total, cubes = 0.0, 0
    for b in range(B):  # boolean indexing, one clip at a time: the reference's formulation
        err = (pred[b] - target[b][queries[b]]).pow(2).mean(dim=-1)  # (N_q,)
        counted = enc[b][queries[b]]
        total += err[counted].sum().item()
        cubes += int(counted.sum())
    loss = vmae.pretrain_loss(pred, vmae.gather_tokens(target, drawn.queries), drawn.in_loss)
    assert loss.item() == pytest.approx(total / cubes, rel=1e-5)


def test_positions_are_the_masks_sorted():
    """The positions the model takes are exactly where the masks say, ascending: the encoder's visible ones,
    the decoder's kept ones (or, V1, every hidden one), and in_loss marks the queries the encoder did not see."""
    cfg = tiny()
    for decoder_ratio in (0.5, 0):
        drawn = masking.MaskConfig(cfg.grid, "tube", 0.75, "random", decoder_ratio).draw(4)
        for b in range(4):
            queried = ~drawn.decoder[b] if decoder_ratio else drawn.encoder[b]
            assert torch.equal(drawn.visible[b], (~drawn.encoder[b]).nonzero().flatten())
            assert torch.equal(drawn.queries[b], queried.nonzero().flatten())
            assert torch.equal(drawn.in_loss[b], drawn.encoder[b][drawn.queries[b]])


def test_drop_path_drops_whole_samples():
    x = torch.ones(64, 5, 3)
    y = vmae.drop_path(x, 0.5, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(dim=1) | (per_sample == 2).all(dim=1)).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert torch.equal(vmae.drop_path(x, 0.5, training=False), x)


def test_drop_path_rates_ramp_per_stack():
    model = vmae.PretrainVideoMAE(tiny(depth=3, decoder_depth=2, drop_path_rate=0.2))
    assert [b.drop_path_rate for b in model.encoder.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert [b.drop_path_rate for b in model.decoder.blocks] == pytest.approx([0.0, 0.2])


def pretrain_step(model, video, drawn):
    cfg = model.cfg
    pred = model(video, drawn.visible, drawn.queries)
    target = vmae.reconstruction_target(video, drawn.queries, cfg.patch_size, cfg.tubelet_size)
    return vmae.pretrain_loss(pred, target, drawn.in_loss)


def step_inputs(cfg, batch=2):
    video = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    return video, masking.MaskConfig(cfg.grid, "tube", 0.75, "run_cell", 0.5).draw(batch)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = tiny()
    plain = vmae.PretrainVideoMAE(cfg)
    ckpt = vmae.PretrainVideoMAE(tiny(with_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    inputs = step_inputs(cfg)
    for model in (plain, ckpt):
        pretrain_step(model, *inputs).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_train_step_is_one_graph_and_matches_eager(backend):
    """fullgraph=True fails on any graph break (a .item(), boolean indexing, a data-dependent shape)."""
    cfg = tiny()
    model = vmae.PretrainVideoMAE(cfg)
    inputs = step_inputs(cfg)
    eager = pretrain_step(model, *inputs)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(pretrain_step, fullgraph=True, backend=backend)(model, *inputs)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(a.grad, b, atol=1e-5, rtol=1e-4)


def test_the_whole_training_step_masks_included_compiles_to_one_graph():
    """The recipe's step draws its masks inside: their counts are plain numbers of the MaskConfig, so drawing
    and sorting them breaks no graph either."""
    import train_pretrain
    cfg = tiny()
    model, video = vmae.PretrainVideoMAE(cfg), torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    masks = masking.MaskConfig(cfg.grid, "tube", 0.75, "run_cell", 0.5)
    torch.manual_seed(1)
    eager = train_pretrain.pretrain_step_loss(model, cfg, video, masks)
    torch._dynamo.reset()
    torch.manual_seed(1)
    compiled = torch.compile(train_pretrain.pretrain_step_loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(model, cfg, video, masks), eager, atol=1e-6, rtol=1e-6)

"""Pretrain VideoMAE V2: tube-masked encoder, running-cell-masked decoder, pixel reconstruction.

Each step draws the two masks on the device, runs the model on a batch of clips, and takes an AdamW step
on the mean squared error of the cubes the encoder did not see and the decoder was asked for (vmae.py
explains the method, masking.py the masks). With no --data_path it trains a small model on the built-in
synthetic clips in minutes on a laptop CPU; explicit flags win over those demo settings.

    python train_pretrain.py                                          # the demo: built-in data, CPU or GPU
    python train_pretrain.py --data_path train.csv --data_root /videos --model base --batch_size 32
    torchrun --standalone --nproc_per_node=8 train_pretrain.py ...     # one machine, 8 GPUs (DDP)
    torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_HOST:29500 train_pretrain.py ...   # 8 machines
    torchrun ... train_pretrain.py --model giant --fsdp --with_checkpoint --precision bf16  # shard ViT-g

--batch_size is per process and micro-step. The learning rate is --lr x batch_size x accum_iter x
processes / 256 (the reference's rule; --num_sample repeats are not counted).
"""
import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import checkpoints
import data
import engine
import masking
import probe
import visualize
import vmae

# -----------------------------------------------------------------------------------------------------
# One pretraining step


def pretrain_step_loss(model: torch.nn.Module, cfg: vmae.VideoMAEConfig, video: torch.Tensor,
                       masks: masking.MaskConfig, normalize_target: bool = True) -> torch.Tensor:
    """Masks, forward, target and loss for one batch of ImageNet-normalised clips (B, 3, T, H, W)."""
    drawn = masks.draw(video.shape[0], video.device)  # both masks and the positions they leave, on the device
    pred = model(video, drawn.visible, drawn.queries)  # (B, N_q, 3·t·p²)
    target = vmae.reconstruction_target(video, drawn.queries, cfg.patch_size, cfg.tubelet_size, normalize_target)
    return vmae.pretrain_loss(pred, target, drawn.in_loss)


def step_flops(cfg: vmae.VideoMAEConfig, batch: int, masks: masking.MaskConfig) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one step, counted by PyTorch's FLOP counter on the meta device
    (no compute): 2 FLOPs per multiply-add, exact shapes."""
    with torch.device("meta"):
        model = vmae.PretrainVideoMAE(cfg)
        video = torch.empty(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)  # (B, 3, T, H, W)
        with FlopCounterMode(display=False) as counter:
            loss = pretrain_step_loss(model, cfg, video, masks)
            forward = counter.get_total_flops()
            loss.backward()
    return forward, counter.get_total_flops()


# -----------------------------------------------------------------------------------------------------
# The command line

# The demo without --data_path (explicit flags win): the laptop size at 32 px (a 4 x 4 x 4 grid of 64 cubes), so the
# fine-tuning demo then learns the clips' labels in minutes. The encoder sees 25 % of the cubes, not 10 % (90 % of
# a 4 x 4 frame would leave it two), and predicts raw pixels (normalised targets on these textured clips keep the
# loss near 1 far longer than the demo lasts). It probes the frozen encoder at the start, after 10 epochs, at the end.
DEMO = dict(**engine.DEMO_CLIPS, mask_ratio=0.75, batch_size=16, epochs=20, warmup_epochs=2, lr=0.03, num_sample=1,
            num_workers=2, save_ckpt_freq=10, normalize_target=False, probe_every=10)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VideoMAE V2 pretraining", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, Range = p.add_argument, engine.Range  # Range: each number's valid interval, checked as it is parsed
    a("--batch_size", type=Range(int, 1), default=32, help="clips per process per micro-step (before --num_sample)")
    a("--accum_iter", type=Range(int, 1), default=1, help="micro-steps accumulated per optimizer step")
    a("--epochs", type=Range(int, 1, 100000), default=200)
    a("--warmup_epochs", type=Range(int, 0), default=20)
    a("--warmup_steps", type=Range(int, -1), default=-1, help="if > 0, overrides --warmup_epochs")
    a("--lr", type=Range(float, 0, open_low=True), default=1e-3, help="base learning rate per 256 clips")
    a("--min_lr", type=Range(float, 0), default=1e-5, help="base LR the cosine decays towards (scaled like --lr)")
    a("--weight_decay", type=Range(float, 0), default=0.05)
    a("--weight_decay_end", type=Range(float, 0), default=None, help="cosine weight-decay end (default: constant)")
    a("--opt_betas", type=Range(float, 0, 1, open_high=True), nargs=2, default=[0.9, 0.95])
    a("--opt_eps", type=Range(float, 0, open_low=True), default=1e-8)
    a("--clip_grad", type=Range(float, 0, open_low=True), default=None, help="max gradient norm (giant's recipe: 0.02)")
    a("--mask_type", default="tube", choices=list(masking.MASKS), help="encoder mask")
    a("--mask_ratio", type=Range(float, 0, 1, open_low=True, open_high=True), default=0.9, help="share of tokens "
      "hidden from the encoder")
    a("--decoder_mask_type", default="run_cell", choices=list(masking.MASKS))
    a("--decoder_mask_ratio", type=Range(float, 0, 1, open_high=True), default=0.5, help="share of tokens dropped "
      "from the decoder; 0 = VideoMAE V1")
    a("--decoder_depth", type=Range(int, 1), default=4)
    a("--num_sample", type=Range(int, 1), default=4, help="augmented clips per decoded video (repeated augmentation)")
    a("--drop_path", type=Range(float, 0, 1, open_high=True), default=0.0)
    a("--normalize_target", "--normlize_target", action=argparse.BooleanOptionalAction, default=True,
      help="predict per-cube normalised pixels")
    a("--data_path", default=None, help="list file (path start_idx total_frames, or one path per line) or a "
      "folder of videos; omitted: the built-in synthetic clips")
    a("--synthetic_size", type=Range(int, 1), default=1024, help="videos in the built-in dataset (without --data_path)")
    a("--normalize_on_device", action="store_true", help="data workers send uint8 crops and the device normalises "
      "them (the same numbers): a quarter of the bytes per clip, and more clips/s per worker")
    a("--output_dir", default="output/pretrain")
    a("--resume", default=None, help="checkpoint to resume from (default: the newest in --output_dir)")
    a("--finetune", default=None, help="initialise the weights from this pretraining checkpoint, decoder included "
      "(progressive training)")
    a("--save_ckpt_freq", type=Range(int, 1), default=50, help="keep checkpoint-<epoch>.pth every n epochs")
    a("--probe_every", type=Range(int, 0), default=0, help="every n epochs (and before the first), score the "
      "frozen encoder on a labelled set (probe.py): probe_acc1 (linear), probe_knn_acc1 and probe_attentive_acc1 in "
      "log.txt; 0 = off")
    a("--probe_data", default=None, help="the probe's labelled clips, a list of `path label` lines (default: "
      "--probe_size held-out built-in clips; needed with --data_path)")
    a("--probe_size", type=Range(int, 2 * probe.NUM_FOLDS), default=512, help="built-in clips in the probe's set")
    a("--probe_pooling", default="slots", choices=probe.POOLINGS, help="tokens -> one vector per clip: the mean "
      "of each temporal slot, concatenated in time order, or one mean over all tokens")
    engine.add_input_flags(p)
    engine.add_run_flags(p)
    return p


class Setup(NamedTuple):
    """The command line resolved: flags, model, the masks on its grid, the --finetune checkpoint (read once)."""
    args: argparse.Namespace
    cfg: vmae.VideoMAEConfig
    masks: masking.MaskConfig
    start: checkpoints.Checkpoint | None


def parse_args(argv=None) -> Setup:
    """Each flag takes its value from the command line, else from the --finetune checkpoint (its model, input
    and decoder depth), else from the demo (without --data_path), else its default."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    start = engine.read_start(parser, args.finetune)
    given = engine.resolve(parser, argv, args, engine.checkpoint_flags(start), DEMO if args.data_path is None else {})
    cfg = engine.config_from_flags(parser, args, given, start, decoder_depth=args.decoder_depth)
    masks = engine.mask_config(parser, args, cfg.grid)
    engine.check_shared_flags(parser, args)
    if args.probe_every and args.data_path is not None and args.probe_data is None:
        parser.error("--probe_every with --data_path needs --probe_data, a list of labelled clips (`path label` lines)")
    if args.probe_data is not None and not Path(args.probe_data).is_file():
        parser.error(f"--probe_data {args.probe_data}: no such file")
    return Setup(args, cfg, masks, start)


# -----------------------------------------------------------------------------------------------------
# The run


def main(argv=None):
    setup = parse_args(argv)
    dist = engine.setup_distributed(setup.args.device)
    with engine.output_folder(Path(setup.args.output_dir), dist):  # this run's alone, writable, no stale files
        pretrain(setup, dist)
    engine.leave_process_group()  # after pretrain() freed DDP's reducer: gloo can deadlock otherwise (pytorch#75097)


def pretrain(setup: Setup, dist: engine.Dist) -> None:
    """Check all that can fail on the user's input (data, weights, disk space, a resume), then run the epochs."""
    args, cfg, masks = setup.args, setup.cfg, setup.masks
    precision = engine.resolve_precision(args.precision, dist.device)
    engine.seed_everything(args.seed)  # the same initial weights on every process

    dataset = data.build_pretrain_dataset(
        args.data_path, args.data_root, num_frames=args.num_frames, sampling_rate=args.sampling_rate,
        input_size=args.input_size, num_sample=args.num_sample, fname_tmpl=args.fname_tmpl,
        skip_bad_videos=args.skip_bad_videos, max_bad_fraction=args.max_bad_fraction,
        synthetic_videos=args.synthetic_size, uint8=args.normalize_on_device, share=engine.file_share(dist))
    probe_set = None
    if args.probe_every:  # --probe_data (its list read and checked now), or built-in clips after the pretraining ones
        probe_set = probe.build_probe(
            args.probe_data, args.data_root, num_frames=args.num_frames, sampling_rate=args.sampling_rate,
            input_size=args.input_size, tubelet_size=args.tubelet_size, fname_tmpl=args.fname_tmpl,
            synthetic_videos=args.probe_size, first_index=args.synthetic_size, pooling=args.probe_pooling,
            batch_size=args.batch_size * args.num_sample, num_workers=args.num_workers, share=engine.file_share(dist))
    model = vmae.PretrainVideoMAE(cfg).to(dist.device)
    if setup.start:
        dist.print(checkpoints.load_weights(model, setup.start))
        setup.start.weights.clear()  # loaded: the file's tensors need not stay in memory for the run
    n_params = sum(p.numel() for p in model.parameters())
    trainer = engine.build_trainer(model, dist, precision, Path(args.output_dir), weight_decay=args.weight_decay,
                                   betas=args.opt_betas, eps=args.opt_eps, fsdp=args.fsdp, compile=args.compile,
                                   seed=args.seed, accum_iter=args.accum_iter, clip_grad=args.clip_grad,
                                   log_every=args.log_every, save_every_steps=args.save_every_steps)
    engine.check_space(trainer)
    batches = engine.train_loader(dataset, args.batch_size, trainer, args.num_workers)

    videos_per_step = args.batch_size * args.accum_iter * dist.world_size
    scale = videos_per_step / 256
    lr_schedule = engine.cosine_schedule(args.lr * scale, args.min_lr * scale, args.epochs, batches.steps_per_epoch,
                                         args.warmup_epochs, warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = engine.cosine_schedule(args.weight_decay, wd_end, args.epochs, batches.steps_per_epoch)
    run_args = engine.run_args(args, dist, dataset)
    state = engine.resume_training(trainer, args.resume, args.auto_resume, run_args, args.allow_resume_changes)
    start_epoch = 0 if state is None else state["epoch"] + 1

    one = masks.draw(1)
    dist.print(f"model {args.model}: {n_params / 1e6:.1f}M parameters, {cfg.num_frames}x{cfg.img_size}, grid "
               f"{cfg.grid} = {cfg.num_tokens} tokens | {dist.device}, {precision}, {dist.world_size} process(es)"
               + (", FSDP" if args.fsdp else "") + (", compiled" if args.compile else ""))
    dist.print(f"data: {args.data_path or 'built-in synthetic clips'} ({len(dataset)} videos)")
    decoder_mask = f"{args.decoder_mask_type} {args.decoder_mask_ratio}" if masks.dual else "V1"
    dist.print(f"target: {'per-cube normalised pixels' if args.normalize_target else 'raw pixels'}; masks per clip: "
               f"encoder sees {masks.num_visible} ({args.mask_type} {args.mask_ratio}), decoder predicts "
               f"{masks.num_queries} ({decoder_mask}), loss on {int(one.in_loss.sum())}")
    dist.print(f"effective batch {videos_per_step} videos = {args.batch_size} x accum {args.accum_iter} x "
               f"{dist.world_size} process(es); x num_sample {args.num_sample} = {batches.clips_per_step} clips per "
               "step")
    warmup = int(np.argmax(lr_schedule)) + 1 if args.warmup_epochs or args.warmup_steps > 0 else 0
    dist.print(f"lr {args.lr:g} x {videos_per_step} / 256 = {args.lr * scale:.3g} (min {args.min_lr * scale:.3g}), "
               f"warmup {warmup} steps; {batches.steps_per_epoch} steps per epoch, {args.epochs} epochs "
               f"({args.epochs * args.num_sample} effective)")

    def loss_of(clips):  # (B, num_sample, 3, T, H, W) normalised clips, num_sample augmentations each
        video = clips.to(dist.device, non_blocking=True).flatten(0, 1)  # (B·num_sample, 3, T, H, W)
        if args.normalize_on_device:
            video = data.normalize(video)  # uint8 pixels -> the clips the workers would have normalised
        return pretrain_step_loss(trainer.model, cfg, video, masks, args.normalize_target)

    def probed() -> dict:  # every process takes part (FSDP gathers the weights); all get the same numbers
        result = probe_set(trainer.model, dist.device, precision)
        start = trainer.extra["probe_init"]  # empty until the random encoder is scored
        dist.print("probe top-1: " + ", ".join(f"{name} {result[key]:.1f} %" + (f" (random start "
                   f"{start[probe.at_start(key)]:.1f})" if start else "") for key, name in probe.NAMES.items())
                   + f" ({len(probe_set.dataset)} clips, {result['probe_time_s']} s)")
        return result
    # before training: the random encoder's score to beat (logged with epoch 0 as probe_init_*, checkpointed till then)
    trainer.extra["probe_init"] = state.get("probe_init", {}) if state else {}
    if probe_set and not start_epoch and not trainer.extra["probe_init"]:
        trainer.extra["probe_init"] = {probe.at_start(key): value for key, value in probed().items()}
    for epoch in range(start_epoch, args.epochs):
        loss, steps, seconds = engine.train_epoch(trainer, batches, loss_of, epoch, lr_schedule, wd_schedule)
        stats = dict(epoch=epoch, train_loss=loss, train_lr=float(lr_schedule[steps - 1]),
                     train_wd=float(wd_schedule[steps - 1]), steps=steps, epoch_time_s=round(seconds, 1),
                     clips_per_s=round(batches.steps_per_epoch * batches.clips_per_step / seconds, 2),
                     skipped_videos=engine.skipped_videos(dist, dataset),
                     **(trainer.extra["probe_init"] if epoch == 0 else {}))
        dist.print(f"epoch {epoch}: loss {loss:.4f}, {stats['clips_per_s']} clips/s, {seconds:.0f} s")
        if probe_set and ((epoch + 1) % args.probe_every == 0 or epoch + 1 == args.epochs):
            stats.update(probed())
        keep = (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs
        state = engine.end_of_epoch(trainer, stats, keep=keep)
    if probe_set and trainer.extra["probe_init"] and args.epochs > start_epoch:  # the last epoch always probes
        dist.print(probe.reading(stats, trainer.extra["probe_init"]))
    if dist.is_main and (args.epochs > start_epoch or not (trainer.out / "recon.png").exists()):  # (a kill before)
        final_figures(state["model"], setup, trainer.out)


def final_figures(weights: dict, setup: Setup, out: Path) -> None:
    """The loss curve and a reconstruction of a held-out built-in clip, next to the checkpoints. Drawn on
    the CPU from the gathered weights, so it works the same after DDP, FSDP or torch.compile."""
    args = setup.args
    visualize.save(visualize.curves_figure([out / "log.txt"]), out / "loss.png")
    model = vmae.PretrainVideoMAE(setup.cfg)
    model.load_state_dict(weights)
    clip = data.held_out_clip(args.num_frames, args.input_size, args.sampling_rate, args.synthetic_size)
    panels = visualize.recon_panels(model, clip, setup.masks.draw(1), args.normalize_target)
    visualize.save(visualize.recon_figure(panels, args.normalize_target, setup.masks.dual), out / "recon.png", dpi=72)
    print(f"figures: {out / 'loss.png'}, {out / 'recon.png'}")


if __name__ == "__main__":
    engine.run(main, preemptible=True)

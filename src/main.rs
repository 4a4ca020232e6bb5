use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use picie::infer::{CrfConfig, DeviceChoice, GuidedConfig, Quality, Refinement, Segmenter};
use picie::model::embedder::BackboneKind;
use picie::package::InputPolicy;

#[derive(Parser)]
#[command(name = "picie", version, about = "Discover and segment visual classes in unlabeled images (PiCIE)")]
struct Cli {
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, global = true, env = "PICIE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(picie::server::ServeConfig),
    /// Print the OpenAPI document.
    Openapi,
    /// Exit 0 when the server on this machine is ready (for container health checks; needs no curl).
    Healthcheck {
        #[arg(long, env = "PICIE_PORT", default_value_t = 8080)]
        port: u16,
    },
    /// Train the embedder with PiCIE on unlabeled images and write a package.
    Train(TrainCli),
    /// Score packages on labelled images (PiCIE protocol: Hungarian-matched pixel accuracy and mIoU).
    Eval(picie::eval::run::EvalArgs),
    /// Backbone weights: import torch checkpoints, check them on ImageNet.
    Weights {
        #[command(subcommand)]
        command: WeightsCommand,
    },
    /// Model packages.
    Package {
        #[command(subcommand)]
        command: PackageCommand,
    },
    /// Write the ONNX graph of a package's embedder.
    Export {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Suggest how many classes a folder of images holds: k-means at each K of a range on one
    /// sample of a package's pixel features; prints each K's distortion and silhouette, and the
    /// K at the knee of the distortion curve.
    SuggestK {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        #[arg(long)]
        images: PathBuf,
        #[arg(long, default_value_t = 4)]
        k_min: usize,
        #[arg(long, default_value_t = 24)]
        k_max: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write the suggestion (the K picked and each K's score) as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Segment images with a package; writes one label-mask PNG per image.
    Segment {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        /// fast, flip (average over a horizontal flip), edges (scores guided-filtered with the
        /// image), crf (dense CRF on the labels) or best (flip and crf).
        #[arg(long, default_value = "edges")]
        quality: Quality,
        /// Dense CRF settings, key=value pairs over the defaults (see `picie serve --help`).
        #[arg(long, default_value = "")]
        crf: CrfConfig,
        /// Guided-filter settings (quality `edges`), key=value pairs over the defaults.
        #[arg(long, default_value = "")]
        guided: GuidedConfig,
        images: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct TrainCli {
    /// Folder of unlabeled training images.
    #[arg(long)]
    images: PathBuf,
    /// The package to write.
    #[arg(long)]
    out: PathBuf,
    /// Fine-tune this package's embedder instead of starting from the pretrained backbone.
    #[arg(long)]
    from: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "efficientnet-lite0")]
    backbone: BackboneKind,
    /// Backbone weights: a file `picie weights import` wrote, or a torch checkpoint read as it
    /// is (the DINO / DINOv2 release files; docs/backbones.md). Default:
    /// .weights/<backbone>.safetensors, where scripts/setup.sh puts the EfficientNet-Lite ones.
    #[arg(long)]
    backbone_weights: Option<PathBuf>,
    #[arg(long, default_value_t = 27)]
    k: usize,
    #[arg(long, default_value_t = 100)]
    k2: usize,
    /// K of the written package's centroids (default: --k).
    #[arg(long)]
    package_k: Option<usize>,
    /// The written package's classes are merged from this many k-means clusters by their
    /// centroids' similarity (0, or not above its K: k-means at K).
    #[arg(long, default_value_t = picie::train::cluster::DEFAULT_OVER_CLUSTER)]
    over_cluster: usize,
    #[arg(long, default_value_t = picie::train::picie::TrainConfig::default().epochs)]
    epochs: usize,
    /// Training frame height, and width unless --width is given (square centre crops).
    #[arg(long, default_value_t = 320)]
    size: usize,
    /// Training frame width: frames keep more of the image when this matches its aspect
    /// ratio (e.g. --size 352 --width 480 for 4:3 street scenes).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "inverse")]
    balance: picie::train::loss::Balance,
    /// Keep backbone layers up to this stride frozen (0, 4, 8, 16, 32).
    #[arg(long, default_value_t = 16)]
    freeze_stride: usize,
    /// Weight of the STEGO-style correspondence term: the embedder's pixel similarities
    /// trained to follow the backbone's stride-16 and stride-32 taps (0: off).
    #[arg(long, default_value_t = 0.0)]
    correspondence: f32,
    /// Shift of the correspondence targets for pairs within a frame (in units of the
    /// teacher's spread; higher pushes more pairs apart).
    #[arg(long, default_value_t = picie::train::correspond::CorrespondenceConfig::default().intra_shift)]
    correspondence_intra_shift: f32,
    /// Shift for pairs across two frames.
    #[arg(long, default_value_t = picie::train::correspond::CorrespondenceConfig::default().inter_shift)]
    correspondence_inter_shift: f32,
    /// Which frame each frame's cross-frame correspondence pairs come from: `batch` (a random
    /// frame) or `nearest` (its nearest neighbour by the backbone's pooled features, as STEGO).
    #[arg(long, value_enum, default_value = "batch")]
    correspondence_partners: picie::train::correspond::Partners,
    /// How the FPN's laterals start: pca (each tap projected onto its principal components on
    /// the training frames, so training starts from the backbone's own features) or random
    /// (seeded, the authors' choice).
    #[arg(long, value_enum, default_value = "pca")]
    fpn_init: picie::train::fpn_init::FpnInit,
    /// Normalise each image's colours before the network, in training and in the written
    /// package's input policy, so exposure and colour cast (dusk against noon) matter less:
    /// none, channels (each channel's mean and spread), luminance (brightness's mean and
    /// spread) or gain (each channel's mean, by a gain). Fine-tuning (--from) keeps the
    /// package's own.
    #[arg(long, value_enum, default_value = "luminance")]
    normalize: picie::infer::preprocess::Normalize,
    /// Range of the photometric views' brightness, contrast and saturation factors, 1 +- this
    /// (default 0.3, the authors'): wider asks the embedder to ignore larger exposure changes.
    #[arg(long)]
    jitter: Option<f32>,
    /// Smallest side of the geometric crop G as a fraction of the frame (0.5: crops of a
    /// quarter to all of its area; lower zooms in further, so a class is seen at more scales).
    #[arg(long, default_value_t = picie::train::picie::TrainConfig::default().min_crop)]
    min_crop: f32,
    /// Checkpoint folder (default: OUT.checkpoint).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value = "picie")]
    name: String,
    #[arg(long)]
    force: bool,
    /// Self-training epochs after PiCIE (0: none): the embedder learns the CRF-refined,
    /// confident labels of the PiCIE package, its centroids fixed.
    #[arg(long, default_value_t = 0)]
    self_train_epochs: usize,
    #[arg(long, default_value_t = picie::train::selftrain::SelfTrainConfig::default().lr)]
    self_train_lr: f64,
    /// How the self-training targets are made (a quality with the CRF: crf or best).
    #[arg(long, default_value = "best")]
    self_train_quality: Quality,
    /// Smallest CRF marginal for a pixel to be a self-training target.
    #[arg(long, default_value_t = picie::train::selftrain::SelfTrainConfig::default().min_confidence)]
    self_train_confidence: f32,
    #[arg(long, value_enum, default_value = "inverse")]
    self_train_balance: picie::train::loss::Balance,
    /// Logits = -cosine distance / this (1: PiCIE's loss; lower sharpens).
    #[arg(long, default_value_t = 1.0)]
    self_train_temperature: f32,
    /// Also write a package after each of these epochs (comma-separated), as OUT-eN beside
    /// --out: one run gives the scores of several epochs.
    #[arg(long, value_delimiter = ',')]
    snapshot_epochs: Vec<usize>,
}

#[derive(Subcommand)]
enum WeightsCommand {
    /// Read a torch checkpoint (legacy or zip) and write safetensors with `backbone.` names.
    Import {
        #[arg(long, value_enum)]
        backbone: BackboneKind,
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// ImageNet top-5 of an EfficientNet-Lite classifier head (checks an import).
    Classify {
        #[arg(long, value_enum, default_value = "efficientnet-lite0")]
        backbone: BackboneKind,
        #[arg(long)]
        weights: PathBuf,
        image: PathBuf,
    },
}

#[derive(Subcommand)]
enum PackageCommand {
    /// Create an untrained package: pretrained backbone, FPN laterals from the taps' principal
    /// components (or seeded), centroids by k-means.
    Init {
        #[arg(long, value_enum, default_value = "efficientnet-lite0")]
        backbone: BackboneKind,
        /// Backbone weights: imported safetensors or a torch checkpoint as released
        /// (default: .weights/<backbone>.safetensors).
        #[arg(long)]
        backbone_weights: Option<PathBuf>,
        #[arg(long)]
        images: PathBuf,
        #[arg(long, default_value_t = 11)]
        k: usize,
        #[arg(long, default_value_t = picie::train::packaging::DEFAULT_FPN_SEED)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long, default_value_t = InputPolicy::default().short_side)]
        short_side: u32,
        /// Replace an existing package at --out (only once the new one is complete).
        #[arg(long)]
        force: bool,
        /// How the FPN's laterals start: pca (from the principal components of the backbone's
        /// taps on --images) or random (seeded).
        #[arg(long, value_enum, default_value = "pca")]
        fpn_init: picie::train::fpn_init::FpnInit,
        /// Normalise each image's colours before the network (see `picie train`).
        #[arg(long, value_enum, default_value = "none")]
        normalize: picie::infer::preprocess::Normalize,
    },
    /// Load and validate a package, print its manifest.
    Check { dir: PathBuf },
    /// A package's trained embedder, with other output settings (hypercolumn features), its
    /// weights blended toward another package's (--blend-with), or the same, its classes fit
    /// again on --images (e.g. with another --over-cluster).
    Rebuild {
        #[arg(long)]
        from: PathBuf,
        /// Weight of the backbone's four taps concatenated to the FPN's features (0: none).
        #[arg(long, default_value_t = 0.0)]
        tap_weight: f32,
        /// Blend the embedder's weights toward this package's, by the share --blend (same
        /// backbone and input; another training run from the same start: the same images,
        /// backbone and --normalize, any --seed; --blend 0.5 averages the two, a model soup).
        #[arg(long, requires = "blend")]
        blend_with: Option<PathBuf>,
        /// Share of the way toward --blend-with: 0 keeps --from's weights, 1 gives --blend-with's.
        #[arg(long, requires = "blend_with")]
        blend: Option<f32>,
        #[arg(long)]
        images: PathBuf,
        /// K of the new centroids (default: the source package's).
        #[arg(long)]
        k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The new classes are merged from this many k-means clusters by their centroids'
        /// similarity (0, or not above K: k-means at K).
        #[arg(long, default_value_t = picie::train::cluster::DEFAULT_OVER_CLUSTER)]
        over_cluster: usize,
        #[arg(long)]
        out: PathBuf,
        /// Name of the new package (default: the source's).
        #[arg(long)]
        name: Option<String>,
        /// Replace an existing package at --out (only once the new one is complete).
        #[arg(long)]
        force: bool,
    },
}

/// This run's command line as a package's provenance records it (`picie ...`).
fn invocation() -> String {
    std::iter::once("picie".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ")
}

/// The server on Tokio's multi-threaded runtime.
#[tokio::main]
async fn serve(cfg: picie::server::ServeConfig) -> Result<()> {
    picie::server::serve(cfg).await
}

fn main() {
    let cli = Cli::parse();
    // Commands that print end quietly when their reader goes away (`picie openapi | head`), as
    // Unix tools do, rather than panicking in println!. The server and the health check keep
    // Rust's ignored SIGPIPE: a peer closing a socket is an error to handle there, not the end.
    if !matches!(cli.command, Command::Serve(_) | Command::Healthcheck { .. }) {
        // SAFETY: no other thread runs yet, and SIG_DFL is a valid disposition for SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // A process that trains keeps freed memory for reuse (see `memory`); set before any thread
    // starts. A server that also serves (`--role all`) keeps glibc's defaults and shrinks back.
    let trains = match &cli.command {
        Command::Train(_) => true,
        Command::Serve(cfg) => cfg.role == picie::server::config::Role::Worker,
        _ => false,
    };
    if trains {
        picie::train::memory::keep_freed_memory();
    }
    // RUST_LOG filters as usual; ONNX Runtime's own chatter stays at warnings.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(cfg) => {
            serve(cfg)?;
        }
        Command::Openapi => println!("{}", picie::server::http::openapi::openapi_json()),
        Command::Healthcheck { port } => {
            picie::server::probe::ready(port)?;
            println!("ready");
        }
        Command::Train(t) => train(t)?,
        Command::Eval(e) => picie::eval::run::run(&e)?,
        Command::Weights { command: WeightsCommand::Import { backbone, checkpoint, out } } => {
            let n = picie::model::import::import_weights(backbone, &checkpoint, &out)?;
            println!("wrote {} ({n} tensors)", out.display());
        }
        Command::Weights { command: WeightsCommand::Classify { backbone, weights, image } } => {
            for (class, p) in picie::model::classify::imagenet_top5(backbone, &weights, &image)? {
                println!("{class:4}  {p:.4}");
            }
        }
        Command::Package {
            command: PackageCommand::Init { backbone, backbone_weights, images, k, seed, out, name, short_side, force, fpn_init, normalize },
        } => {
            let args = picie::train::packaging::InitPackage {
                backbone,
                backbone_weights: backbone_weights.unwrap_or_else(|| backbone.default_weights()),
                images,
                k,
                seed,
                out,
                name,
                policy: InputPolicy { short_side, normalize, ..InputPolicy::default() },
                replace: force,
                command: invocation(),
                fpn_init,
            };
            let mut progress = picie::progress::Reporter::new("package init");
            let (pkg, report) = picie::train::packaging::init_package(&args, &mut |f, what| progress.update(f, what))?;
            progress.finish();
            println!(
                "wrote {} (K = {}, {} images, {} vectors clustered{})",
                pkg.dir.display(),
                pkg.manifest.k,
                report.images_used,
                report.vectors,
                if report.skipped.is_empty() { String::new() } else { format!(", skipped: {}", report.skipped.join(", ")) }
            );
        }
        Command::Package {
            command: PackageCommand::Rebuild { from, tap_weight, blend_with, blend, images, k, seed, over_cluster, out, name, force },
        } => {
            let args = picie::train::packaging::RebuildPackage {
                from,
                tap_weight,
                blend: blend_with.zip(blend),
                images,
                k,
                seed,
                over_cluster,
                out,
                name,
                replace: force,
                command: invocation(),
            };
            let mut progress = picie::progress::Reporter::new("package rebuild");
            let (pkg, report) = picie::train::packaging::rebuild_package(&args, &mut |f, what| progress.update(f, what))?;
            progress.finish();
            println!(
                "wrote {} (K = {}, {} features per pixel, {} vectors clustered)",
                pkg.dir.display(),
                pkg.manifest.k,
                pkg.manifest.embedder.output_dim(),
                report.vectors
            );
        }
        Command::Package { command: PackageCommand::Check { dir } } => {
            let pkg = picie::package::Package::load(&dir)?;
            println!("{}", serde_json::to_string_pretty(&pkg.manifest)?);
        }
        Command::Export { model, out } => {
            picie::package::Package::load(&model)?.export_onnx(&out)?;
            println!("wrote {}", out.display());
        }
        Command::SuggestK { model, images, k_min, k_max, seed, json } => {
            picie::train::ksuggest::check_range(k_min, k_max, picie::package::MAX_CLASSES).map_err(anyhow::Error::msg)?;
            let pkg = picie::package::Package::load(&model)?;
            let session = picie::infer::EmbedSession::load(&pkg.onnx_path(), DeviceChoice::Auto, None)?;
            let paths = picie::train::cluster::list_images(&images)?;
            let mut bar = picie::progress::Reporter::new("suggest K");
            let features = picie::train::cluster::embed_sampled(
                &session,
                &pkg.manifest.input,
                &paths,
                picie::train::cluster::MAX_CLUSTER_VECTORS,
                seed,
                |done, total| {
                    bar.update(0.5 * done as f64 / total.max(1) as f64, &format!("embedding image {done}/{total}"));
                    true
                },
            )?;
            let suggestion = picie::train::ksuggest::suggest_k(&features.vectors, features.dim, k_min, k_max, seed, |done, total| {
                bar.update(0.5 + 0.5 * done as f64 / total as f64, &format!("k-means at K = {}", k_min + done - 1));
                true
            })?
            .expect("never stopped");
            bar.finish();
            for s in &suggestion.scores {
                let picked = if s.k == suggestion.k { "  <- picked (knee)" } else { "" };
                println!("K = {:3}  distortion {:.4}  silhouette {:.4}{picked}", s.k, s.distortion, s.silhouette);
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&suggestion)?)?;
            }
        }
        Command::Segment { model, out, device, quality, crf, guided, images } => {
            let seg = Segmenter::load(&model, device, None)?;
            std::fs::create_dir_all(&out)?;
            for path in images {
                let img = picie::infer::preprocess::decode_file(&path)?;
                let mask = seg.segment_batch_at(std::slice::from_ref(&img), quality, &Refinement { crf, guided })?.remove(0);
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
                let dest = out.join(format!("{stem}.png"));
                image::GrayImage::from_raw(mask.width, mask.height, mask.labels).expect("mask size").save(&dest)?;
                println!("{} -> {}", path.display(), dest.display());
            }
        }
    }
    Ok(())
}

fn train(t: TrainCli) -> Result<()> {
    use picie::train::picie::TrainConfig;
    use picie::train::pipeline::{TrainArgs, TrainInit};
    let config = TrainConfig {
        k: t.k,
        k2: t.k2,
        epochs: t.epochs,
        size: t.size,
        width: t.width,
        batch: t.batch,
        lr: t.lr,
        seed: t.seed,
        balance: t.balance,
        freeze_stride: t.freeze_stride,
        correspondence: picie::train::correspond::CorrespondenceConfig {
            weight: t.correspondence,
            intra_shift: t.correspondence_intra_shift,
            inter_shift: t.correspondence_inter_shift,
            partners: t.correspondence_partners,
        },
        fpn_init: t.fpn_init,
        normalize: t.normalize,
        jitter: t.jitter,
        min_crop: t.min_crop,
        ..TrainConfig::default()
    };
    let init = match t.from {
        Some(p) => TrainInit::Package(p),
        None => {
            let weights = t.backbone_weights.unwrap_or_else(|| t.backbone.default_weights());
            TrainInit::Backbone { kind: t.backbone, weights }
        }
    };
    let args = TrainArgs {
        checkpoint: t.checkpoint.unwrap_or_else(|| picie::train::pipeline::default_checkpoint(&t.out)),
        images: picie::train::cluster::list_images(&t.images)?,
        out: t.out,
        init,
        config,
        package_k: t.package_k,
        package_over_cluster: t.over_cluster,
        resume: t.resume,
        name: t.name,
        replace: t.force,
        command: invocation(),
        self_train: (t.self_train_epochs > 0).then(|| picie::train::selftrain::SelfTrainConfig {
            epochs: t.self_train_epochs,
            lr: t.self_train_lr,
            quality: t.self_train_quality,
            min_confidence: t.self_train_confidence,
            balance: t.self_train_balance,
            temperature: t.self_train_temperature,
            ..Default::default()
        }),
        snapshots: t.snapshot_epochs,
        job: None,
    };
    let mut progress = picie::progress::Reporter::new("training");
    let outcome = picie::train::pipeline::train(&args, &mut |p| {
        progress.update(p.fraction(), &p.describe());
        if let Some(line) = p.epoch_done() {
            progress.milestone(&line);
        }
        true
    })?;
    progress.finish();
    match outcome {
        Some((pkg, report)) => {
            println!("wrote {} (K = {}, trained on {} images)", pkg.dir.display(), pkg.manifest.k, report.images_used);
        }
        None => println!("stopped; the last checkpoint is in {}", args.checkpoint.display()),
    }
    Ok(())
}

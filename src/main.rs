use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use picie::commands;
use picie::infer::{DeviceChoice, Segmenter};
use picie::model::embedder::BackboneKind;
use picie::package::InputPolicy;

#[derive(Parser)]
#[command(name = "picie", version, about = "Discover and segment visual classes in unlabeled images (PiCIE)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(picie::server::ServeConfig),
    /// Print the OpenAPI document.
    Openapi,
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
    /// Segment images with a package; writes one label-mask PNG per image.
    Segment {
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        images: Vec<PathBuf>,
    },
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
    /// ImageNet top-5 of the EfficientNet-Lite0 classifier head (checks an import).
    Classify {
        #[arg(long)]
        weights: PathBuf,
        image: PathBuf,
    },
}

#[derive(Subcommand)]
enum PackageCommand {
    /// Create an untrained package: pretrained backbone, seeded FPN, centroids by k-means.
    Init {
        #[arg(long, value_enum, default_value = "efficientnet-lite0")]
        backbone: BackboneKind,
        #[arg(long)]
        backbone_weights: PathBuf,
        #[arg(long)]
        images: PathBuf,
        #[arg(long, default_value_t = 11)]
        k: usize,
        #[arg(long, default_value_t = commands::DEFAULT_FPN_SEED)]
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
    },
    /// Load and validate a package, print its manifest.
    Check { dir: PathBuf },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(cfg) => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(picie::server::serve(cfg))?;
        }
        Command::Openapi => println!("{}", picie::server::openapi_json()),
        Command::Weights { command: WeightsCommand::Import { backbone, checkpoint, out } } => {
            let n = commands::import_weights(backbone, &checkpoint, &out)?;
            println!("wrote {} ({n} tensors)", out.display());
        }
        Command::Weights { command: WeightsCommand::Classify { weights, image } } => {
            for (class, p) in commands::imagenet_top5(&weights, &image)? {
                println!("{class:4}  {p:.4}");
            }
        }
        Command::Package { command: PackageCommand::Init { backbone, backbone_weights, images, k, seed, out, name, short_side, force } } => {
            let args = commands::InitPackage {
                backbone,
                backbone_weights,
                images,
                k,
                seed,
                out,
                name,
                policy: InputPolicy { short_side, ..InputPolicy::default() },
                replace: force,
                command: std::iter::once("picie".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" "),
            };
            let (pkg, report) = commands::init_package(&args)?;
            println!(
                "wrote {} (K = {}, {} images, {} vectors clustered{})",
                pkg.dir.display(),
                pkg.manifest.k,
                report.images_used,
                report.vectors,
                if report.skipped.is_empty() { String::new() } else { format!(", skipped: {}", report.skipped.join(", ")) }
            );
        }
        Command::Package { command: PackageCommand::Check { dir } } => {
            let pkg = picie::package::Package::load(&dir)?;
            println!("{}", serde_json::to_string_pretty(&pkg.manifest)?);
        }
        Command::Export { model, out } => {
            commands::export_package(&model, &out)?;
            println!("wrote {}", out.display());
        }
        Command::Segment { model, out, device, images } => {
            let seg = Segmenter::load(&model, device, None)?;
            std::fs::create_dir_all(&out)?;
            for path in images {
                let img = picie::infer::preprocess::decode_file(&path)?;
                let mask = seg.segment(&img)?;
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
                let dest = out.join(format!("{stem}.png"));
                image::GrayImage::from_raw(mask.width, mask.height, mask.labels)
                    .expect("mask size")
                    .save(&dest)?;
                println!("{} -> {}", path.display(), dest.display());
            }
        }
    }
    Ok(())
}

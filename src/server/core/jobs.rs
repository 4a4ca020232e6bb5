//! Background jobs as the API shows them and the stores keep them: what a job does (its spec,
//! checked against the limits here, the one definition the schema, the handler and the trainer
//! share), where it stands (state, stage, progress) and what it made (its report).

use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::ToSchema;

use crate::infer::Quality;
use crate::train::cluster::KChoice;
use crate::train::ksuggest::{check_range, KScore};
use crate::train::picie::{Phase, TrainConfig};
use crate::train::selftrain::SelfTrainConfig;

/// The range K is suggested from when a re-clustering job gives none.
pub const DEFAULT_K_MIN: usize = 4;
pub const DEFAULT_K_MAX: usize = 24;

/// What one job may ask for: bounds that keep its memory and time within reason inside a
/// serving process. The OpenAPI schema states them from these constants.
pub mod limits {
    /// Clusters of a model (class indices are 8-bit in masks).
    pub const MAX_CLASSES: usize = crate::package::MAX_CLASSES;
    pub const MAX_K2: usize = 1000;
    /// Over-clusters a new model's classes may be merged from (each is scored at every pixel).
    pub const MAX_OVER_CLUSTER: usize = crate::package::MAX_MEMBERS;
    pub const MAX_EPOCHS: usize = 100;
    /// The longest side of a fine-tuning job's training frames.
    pub const MAX_SIDE: usize = 2048;
    pub const MAX_BATCH: usize = 64;
    /// Pixels of one training step, batch x width x height: a step holds about 2.6 KB of
    /// activations and gradients per pixel, so this is about 3.5 GB (eight whole 480 x 352
    /// frames).
    pub const MAX_BATCH_PIXELS: usize = 8 * 480 * 352;
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    Interrupted,
}

impl JobState {
    pub const ALL: [JobState; 6] =
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Canceled, JobState::Interrupted];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
            JobState::Interrupted => "interrupted",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// What a job is doing now.
#[derive(Serialize, Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum JobStage {
    Queued,
    Starting,
    /// Fetching the dataset and the source model.
    Loading,
    /// Running the embedder over the dataset (re-clustering).
    Embedding,
    /// Re-clustering at each K of a range to suggest one.
    Suggesting,
    /// A PiCIE epoch's clustering pass.
    Cluster,
    /// A PiCIE epoch's labelling pass.
    Label,
    /// A PiCIE epoch's gradient steps.
    Train,
    /// Self-training's labelling of every frame.
    PseudoLabel,
    /// Self-training epochs.
    SelfTrain,
    /// Segmenting a dataset's images into masks.
    Segmenting,
    /// Reading a segmented dataset's masks back into its class fractions and gallery.
    Summarizing,
    /// Writing and publishing the new model version, or a segmentation's results.
    Publishing,
    Done,
    Failed,
    Canceled,
    Interrupted,
    /// A stage this version does not know (a job stored by another version).
    #[serde(other)]
    Other,
}

impl From<Phase> for JobStage {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Cluster => JobStage::Cluster,
            Phase::Label => JobStage::Label,
            Phase::Train => JobStage::Train,
            Phase::PseudoLabel => JobStage::PseudoLabel,
            Phase::SelfTrain => JobStage::SelfTrain,
        }
    }
}

/// The maximum of a field, from a limit constant.
fn at_most(max: usize, min: usize) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(min as f64)).maximum(Some(max as f64))
}

fn classes_schema() -> ObjectBuilder {
    at_most(limits::MAX_CLASSES, 2)
}

fn k2_schema() -> ObjectBuilder {
    at_most(limits::MAX_K2, 3)
}

fn over_cluster_schema() -> ObjectBuilder {
    at_most(limits::MAX_OVER_CLUSTER, 0)
}

fn epochs_schema() -> ObjectBuilder {
    at_most(limits::MAX_EPOCHS, 1)
}

fn self_train_epochs_schema() -> ObjectBuilder {
    at_most(limits::MAX_EPOCHS, 0)
}

fn side_schema() -> ObjectBuilder {
    at_most(limits::MAX_SIDE, 32).multiple_of(Some(32.0))
}

fn batch_schema() -> ObjectBuilder {
    at_most(limits::MAX_BATCH, 1)
}

/// What a job does.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum JobSpec {
    /// Cluster a dataset's pixels with the active model's embedder into `k` classes; writes a new
    /// model version. Without `k`, K is suggested: k-means at every K from `k_min` to `k_max`
    /// (default 4 to 24) on one sample of the features, and the K at the knee of the distortion
    /// curve (mean cosine distance to the nearest centroid) is picked; the result lists each K's
    /// distortion and silhouette.
    Recluster {
        #[schema(pattern = "^ds-[0-9a-f]{12}$")]
        dataset: String,
        #[serde(default)]
        #[schema(schema_with = classes_schema)]
        k: Option<usize>,
        /// The range K is suggested from when `k` is left out (at most 40 values).
        #[serde(default)]
        #[schema(schema_with = classes_schema)]
        k_min: Option<usize>,
        #[serde(default)]
        #[schema(schema_with = classes_schema)]
        k_max: Option<usize>,
        #[serde(default)]
        seed: Option<u64>,
        /// The new model's K classes are merged from this many k-means clusters by their
        /// centroids' similarity (default 50; 0 or at most K: k-means at K).
        #[serde(default)]
        #[schema(schema_with = over_cluster_schema)]
        over_cluster: Option<usize>,
        /// Name of the new model version (default `recluster-<job id>`).
        #[serde(default)]
        #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")]
        name: Option<String>,
    },
    /// Fine-tune the active model's embedder with PiCIE on a dataset; writes a new model version
    /// whose centroids are re-clustered on the dataset. Batch x width x height is at most
    /// 1,351,680 pixels (eight 480 x 352 frames).
    Finetune {
        #[schema(pattern = "^ds-[0-9a-f]{12}$")]
        dataset: String,
        /// Clusters of the training head (default 27).
        #[serde(default)]
        #[schema(schema_with = classes_schema)]
        k: Option<usize>,
        /// Over-clustering head (default 100).
        #[serde(default)]
        #[schema(schema_with = k2_schema)]
        k2: Option<usize>,
        /// Default 1.
        #[serde(default)]
        #[schema(schema_with = epochs_schema)]
        epochs: Option<usize>,
        /// Default 3e-4.
        #[serde(default)]
        #[schema(exclusive_minimum = 0.0, exclusive_maximum = 1.0)]
        lr: Option<f64>,
        #[serde(default)]
        seed: Option<u64>,
        /// Height of the training frames, a multiple of 32 (default 320); square frames
        /// unless `width` is given.
        #[serde(default)]
        #[schema(schema_with = side_schema)]
        size: Option<usize>,
        /// Width of the training frames, a multiple of 32 (default: `size`).
        #[serde(default)]
        #[schema(schema_with = side_schema)]
        width: Option<usize>,
        /// Backbone layers up to this stride stay frozen: 0, 4, 8, 16 or 32 (default 16, the
        /// setting the shipped model was trained with).
        #[serde(default)]
        freeze_stride: Option<usize>,
        /// Images per step (default 8).
        #[serde(default)]
        #[schema(schema_with = batch_schema)]
        batch: Option<usize>,
        /// K of the new model's centroids (default: the source model's K).
        #[serde(default)]
        #[schema(schema_with = classes_schema)]
        package_k: Option<usize>,
        /// The new model's classes are merged from this many k-means clusters by their
        /// centroids' similarity (default 50; 0 or at most its K: k-means at K).
        #[serde(default)]
        #[schema(schema_with = over_cluster_schema)]
        over_cluster: Option<usize>,
        /// Name of the new model version (default `finetune-<job id>`).
        #[serde(default)]
        #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")]
        name: Option<String>,
        /// Self-training epochs after the PiCIE epochs (default 0: none): the embedder learns
        /// the CRF-refined, confident labels of the PiCIE result, its centroids held fixed.
        #[serde(default)]
        #[schema(schema_with = self_train_epochs_schema)]
        self_train_epochs: Option<usize>,
    },
    /// Segment every image of a dataset: one mask per image, each image's class fractions and a
    /// gallery of each class, downloadable as one archive (`GET /jobs/{id}/masks.zip`) once the
    /// job succeeds. Writes no model.
    Segment {
        #[schema(pattern = "^ds-[0-9a-f]{12}$")]
        dataset: String,
        /// Default: the server's `--quality`.
        #[serde(default)]
        quality: Option<Quality>,
        /// The model version to segment with (default: the active one when the job is submitted).
        #[serde(default)]
        #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")]
        model: Option<String>,
    },
}

impl JobSpec {
    pub fn dataset(&self) -> &str {
        match self {
            JobSpec::Recluster { dataset, .. } | JobSpec::Finetune { dataset, .. } | JobSpec::Segment { dataset, .. } => dataset,
        }
    }

    /// Whether the job writes a model version (a segmentation writes results instead).
    pub fn writes_model(&self) -> bool {
        !matches!(self, JobSpec::Segment { .. })
    }

    /// The model name the spec asks for, if any.
    pub fn requested_name(&self) -> Option<&str> {
        match self {
            JobSpec::Recluster { name, .. } | JobSpec::Finetune { name, .. } => name.as_deref(),
            JobSpec::Segment { .. } => None,
        }
    }

    /// The model a segmentation asks to be run with, if any.
    pub fn requested_model(&self) -> Option<&str> {
        match self {
            JobSpec::Segment { model, .. } => model.as_deref(),
            _ => None,
        }
    }

    /// The name of the model version job `id` writes: the one asked for, else `<kind>-<id>`
    /// (for a segmentation, which writes none, the name its results would have).
    pub fn model_name(&self, id: &str) -> String {
        let kind = match self {
            JobSpec::Recluster { .. } => "recluster",
            JobSpec::Finetune { .. } => "finetune",
            JobSpec::Segment { .. } => "segment",
        };
        self.requested_name().map(str::to_string).unwrap_or_else(|| format!("{kind}-{}", id.trim_start_matches("job-")))
    }

    /// The K of a re-clustering job: given, or suggested from its range (defaults filled in).
    pub fn k_choice(&self) -> Result<KChoice, String> {
        let JobSpec::Recluster { k, k_min, k_max, .. } = self else { return Err("not a re-clustering job".into()) };
        match (k, k_min, k_max) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err("give k, or a range k_min to k_max to suggest it from; not both".into()),
            (Some(k), None, None) if (2..=limits::MAX_CLASSES).contains(k) => Ok(KChoice::Fixed(*k)),
            (Some(k), None, None) => Err(format!("k must be between 2 and {} (got {k})", limits::MAX_CLASSES)),
            (None, min, max) => {
                let (min, max) = (min.unwrap_or(DEFAULT_K_MIN), max.unwrap_or(DEFAULT_K_MAX));
                check_range(min, max, limits::MAX_CLASSES)?;
                Ok(KChoice::Suggest { min, max })
            }
        }
    }

    /// The over-clusters a new model's classes are merged from (0: none), default filled in.
    pub fn over_cluster(&self) -> usize {
        match self {
            JobSpec::Recluster { over_cluster, .. } | JobSpec::Finetune { over_cluster, .. } => {
                over_cluster.unwrap_or(crate::train::cluster::DEFAULT_OVER_CLUSTER)
            }
            JobSpec::Segment { .. } => 0,
        }
    }

    /// The training settings of a fine-tuning job, defaults filled in.
    pub fn finetune_config(&self) -> Option<TrainConfig> {
        let JobSpec::Finetune { k, k2, epochs, lr, seed, size, width, freeze_stride, batch, .. } = self else { return None };
        let d = TrainConfig::default();
        Some(TrainConfig {
            k: k.unwrap_or(d.k),
            k2: k2.unwrap_or(d.k2),
            epochs: epochs.unwrap_or(1),
            lr: lr.unwrap_or(d.lr),
            seed: seed.unwrap_or(0),
            size: size.unwrap_or(d.size),
            width: *width,
            batch: batch.unwrap_or(d.batch),
            freeze_stride: freeze_stride.unwrap_or(d.freeze_stride),
            // Fine-tuning starts from the package's embedder: its laterals are already set.
            fpn_init: crate::train::fpn_init::FpnInit::Random,
            ..d
        })
    }

    /// The self-training stage of a fine-tuning job, if it asks for one.
    pub fn self_train(&self) -> Option<SelfTrainConfig> {
        let JobSpec::Finetune { self_train_epochs: Some(epochs), .. } = self else { return None };
        (*epochs > 0).then(|| SelfTrainConfig { epochs: *epochs, ..Default::default() })
    }

    /// Checks the spec against the limits and a dataset of `images` images; the error says
    /// what is wrong, for a 400.
    pub fn validate(&self, images: usize) -> Result<(), String> {
        use limits::*;
        if let Some(n) = self.requested_name().or(self.requested_model()) {
            if !super::valid_name(n) {
                return Err(format!("`{n}` is not a valid model name (letters, digits, . _ -)"));
            }
        }
        if images == 0 {
            return Err(format!("dataset `{}` has no images", self.dataset()));
        }
        if self.over_cluster() > MAX_OVER_CLUSTER {
            return Err(format!("over_cluster is at most {MAX_OVER_CLUSTER} (got {})", self.over_cluster()));
        }
        let classes = |what: &str, k: usize| {
            if (2..=MAX_CLASSES).contains(&k) {
                Ok(())
            } else {
                Err(format!("{what} must be between 2 and {MAX_CLASSES} (got {k})"))
            }
        };
        match self {
            JobSpec::Segment { .. } => Ok(()),
            JobSpec::Recluster { .. } => self.k_choice().map(|_| ()),
            JobSpec::Finetune { package_k, epochs, lr, self_train_epochs, .. } => {
                let config = self.finetune_config().expect("a finetune spec");
                let (width, height) = config.frame();
                if width > MAX_SIDE || height > MAX_SIDE {
                    return Err(format!("size and width are at most {MAX_SIDE}"));
                }
                if config.batch > MAX_BATCH || config.k2 > MAX_K2 {
                    return Err(format!("batch is at most {MAX_BATCH} and k2 at most {MAX_K2}"));
                }
                if config.batch * width * height > MAX_BATCH_PIXELS {
                    return Err(format!(
                        "batch x width x height is at most {MAX_BATCH_PIXELS} pixels (got {} x {width} x {height})",
                        config.batch
                    ));
                }
                classes("k", config.k)?;
                if let Some(k) = package_k {
                    classes("package_k", *k)?;
                }
                if epochs.is_some_and(|e| e == 0 || e > MAX_EPOCHS) || self_train_epochs.is_some_and(|e| e > MAX_EPOCHS) {
                    return Err(format!("epochs must be between 1 and {MAX_EPOCHS}, self_train_epochs at most {MAX_EPOCHS}"));
                }
                if lr.is_some_and(|lr| !(lr > 0.0 && lr < 1.0)) {
                    return Err("lr must be in (0, 1)".into());
                }
                config.validate(images).map_err(|e| format!("{e:#}"))
            }
        }
    }
}

/// What a job made.
#[derive(Serialize, Deserialize, ToSchema, Clone, Debug, Default, PartialEq)]
pub struct JobReport {
    /// The model version written; for a segmentation, the version that segmented.
    pub model: String,
    pub k: usize,
    /// The job had written its model before it was interrupted; resuming it found the model.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
    /// Re-clustering: images embedded, files skipped as unreadable, pixel features clustered
    /// (a uniform sample of the features seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_used: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vectors: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vectors_seen: Option<u64>,
    /// Re-clustering with K suggested: each K tried, its distortion and silhouette (`k` is the
    /// one picked, at the distortion's knee).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k_scores: Option<Vec<KScore>>,
    /// Fine-tuning: PiCIE epochs and each epoch's mean loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_losses: Option<Vec<f32>>,
    /// Segmentation: the quality the masks were made at, the masks made (one per readable
    /// image) and each class's share of all the dataset's pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<Quality>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masks: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<Vec<f64>>,
    /// Where the job's embedder ran: `cpu` or `cuda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The threads of the job's pool and of its ONNX Runtime sessions.
    #[serde(default)]
    pub job_threads: usize,
    #[serde(default)]
    pub session_threads: usize,
}

#[derive(Serialize, Deserialize, ToSchema, Clone, Debug)]
pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub stage: JobStage,
    /// The epoch the stage belongs to (1-based) and the stage's epochs, while training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// 0 to 1.
    pub progress: f64,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub result: Option<JobReport>,
    pub error: Option<String>,
    /// The model the job started from.
    pub source_model: String,
    /// How many times the job was resumed after it was interrupted or failed.
    #[serde(default)]
    pub resumed: u32,
    /// Scaled out: the worker (`--instance-id`) that runs or ran the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// Where a running job stands, as it reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Standing {
    pub stage: JobStage,
    pub epoch: Option<usize>,
    pub epochs: Option<usize>,
    pub progress: f64,
}

impl Standing {
    pub fn at(stage: JobStage, progress: f64) -> Self {
        Self { stage, epoch: None, epochs: None, progress: progress.clamp(0.0, 1.0) }
    }
}

impl Job {
    /// A new queued job with a fresh id.
    pub fn new(spec: JobSpec, source_model: String) -> Self {
        Self {
            id: format!("job-{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff),
            spec,
            state: JobState::Queued,
            stage: JobStage::Queued,
            epoch: None,
            epochs: None,
            progress: 0.0,
            created_at: crate::package::now_rfc3339(),
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
            source_model,
            resumed: 0,
            worker: None,
        }
    }

    /// The name of the model version this job writes.
    pub fn model_name(&self) -> String {
        self.spec.model_name(&self.id)
    }

    pub fn stand(&mut self, s: Standing) {
        (self.stage, self.epoch, self.epochs, self.progress) = (s.stage, s.epoch, s.epochs, s.progress);
    }

    /// Running, from now.
    pub fn start(&mut self) {
        self.state = JobState::Running;
        self.stand(Standing::at(JobStage::Starting, 0.0));
        self.started_at.get_or_insert_with(crate::package::now_rfc3339);
    }

    /// Back to `queued` for `POST /jobs/{id}/resume`: only an interrupted or failed job, its
    /// outcome cleared and the resumption counted. Err with the state it is in otherwise.
    pub fn requeue(&mut self) -> Result<(), JobState> {
        if !matches!(self.state, JobState::Interrupted | JobState::Failed) {
            return Err(self.state);
        }
        self.state = JobState::Queued;
        self.stand(Standing::at(JobStage::Queued, 0.0));
        self.finished_at = None;
        self.result = None;
        self.error = None;
        self.resumed += 1;
        Ok(())
    }

    /// The job's end: succeeded with its report, canceled, or failed with its error.
    pub fn finish(&mut self, outcome: Result<JobReport, String>, canceled: bool) {
        self.finished_at = Some(crate::package::now_rfc3339());
        (self.epoch, self.epochs) = (None, None);
        match outcome {
            Ok(report) => {
                self.state = JobState::Succeeded;
                self.stand(Standing::at(JobStage::Done, 1.0));
                self.result = Some(report);
            }
            Err(_) if canceled => {
                self.state = JobState::Canceled;
                self.stage = JobStage::Canceled;
            }
            Err(e) => {
                self.state = JobState::Failed;
                self.stage = JobStage::Failed;
                self.error = Some(e);
            }
        }
    }

    /// Interrupted: it was running when its process stopped; `why` says how, and how to resume.
    pub fn interrupt(&mut self, why: String) {
        self.state = JobState::Interrupted;
        self.stage = JobStage::Interrupted;
        (self.epoch, self.epochs) = (None, None);
        self.finished_at = Some(crate::package::now_rfc3339());
        self.error = Some(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finetune(batch: usize, size: usize, width: Option<usize>) -> JobSpec {
        JobSpec::Finetune {
            dataset: "ds-000000000001".into(),
            k: None,
            k2: None,
            epochs: None,
            lr: None,
            seed: None,
            size: Some(size),
            width,
            freeze_stride: None,
            batch: Some(batch),
            package_k: None,
            over_cluster: None,
            name: None,
            self_train_epochs: None,
        }
    }

    #[test]
    fn one_training_step_is_bounded_in_pixels() {
        assert!(finetune(8, 352, Some(480)).validate(100).is_ok(), "eight whole CamVid frames fit");
        let e = finetune(64, 2048, None).validate(100).unwrap_err();
        assert!(e.contains("batch x width x height"), "{e}");
        assert!(finetune(9, 352, Some(480)).validate(100).is_err());
        assert!(finetune(1, 1024, Some(1024)).validate(100).is_ok(), "one large frame fits");
    }

    #[test]
    fn stored_jobs_of_other_versions_still_read() {
        // A job file from before stages were typed: a stage string this version does not know.
        let old = serde_json::json!({
            "id": "job-1", "spec": {"type": "recluster", "dataset": "ds-1", "k": 3}, "state": "running",
            "stage": "train epoch 2/3", "progress": 0.5, "created_at": "t", "started_at": null,
            "finished_at": null, "result": {"model": "m", "k": 3, "images_used": 4, "session_threads": 1},
            "error": null, "source_model": "default"
        });
        let job: Job = serde_json::from_value(old).unwrap();
        assert_eq!(job.stage, JobStage::Other);
        assert_eq!(job.result.unwrap().images_used, Some(4));
    }

    #[test]
    fn the_schema_states_the_limits() {
        let doc = serde_json::to_value(<JobSpec as utoipa::PartialSchema>::schema()).unwrap().to_string();
        for limit in [limits::MAX_EPOCHS, limits::MAX_SIDE, limits::MAX_BATCH, limits::MAX_K2, limits::MAX_CLASSES] {
            assert!(doc.contains(&format!("\"maximum\":{limit}")), "{limit} missing from {doc}");
        }
    }
}

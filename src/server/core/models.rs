//! Model versions as the API shows them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::package::{Centroids, Manifest};

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct ModelSummary {
    pub name: String,
    pub active: bool,
    /// Shipped with the server (its read-only models folder): never deleted. A shipped model
    /// whose classes were renamed is served from an edited copy in the data folder.
    pub builtin: bool,
    pub k: usize,
    /// As `--backbone` names it, e.g. `efficientnet-lite0`.
    pub backbone: String,
    pub trained: bool,
    pub created_at: String,
}

impl ModelSummary {
    pub fn of(name: &str, manifest: &Manifest, active: bool, builtin: bool) -> Self {
        Self {
            name: name.to_string(),
            active,
            builtin,
            k: manifest.k,
            backbone: manifest.embedder.backbone.name(),
            trained: manifest.provenance.trained,
            created_at: manifest.provenance.created_at.clone(),
        }
    }
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct ClassView {
    pub index: usize,
    pub name: String,
    pub color: [u8; 3],
    /// Whether the name was set by a person (otherwise `class N`).
    pub named: bool,
}

impl ClassView {
    pub fn all(c: &Centroids) -> Vec<ClassView> {
        (0..c.k()).map(|i| ClassView { index: i, name: c.name(i), color: c.color(i), named: c.classes[i].name.is_some() }).collect()
    }
}

#[derive(Serialize, ToSchema, Clone, Debug)]
pub struct ModelDetail {
    pub name: String,
    pub active: bool,
    pub builtin: bool,
    /// The package manifest as stored.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
    pub classes: Vec<ClassView>,
}

/// One class's new name or colour.
#[derive(Deserialize, ToSchema, Clone, Debug)]
pub struct ClassUpdate {
    /// The class, 0 to K - 1.
    #[schema(maximum = 254)]
    pub index: usize,
    /// New name (at most 64 characters); an empty string clears it.
    #[schema(max_length = 64)]
    pub name: Option<String>,
    /// New RGB colour.
    #[schema(min_items = 3, max_items = 3)]
    pub color: Option<[u8; 3]>,
}

#[derive(Deserialize, ToSchema, Clone, Debug)]
pub struct ClassesUpdate {
    pub classes: Vec<ClassUpdate>,
}

/// The longest class name.
pub const MAX_CLASS_NAME: usize = 64;

impl ClassesUpdate {
    /// The centroids with the update applied; the error says what is wrong, for a 400.
    pub fn apply(&self, centroids: &Centroids) -> Result<Centroids, String> {
        let mut c = centroids.clone();
        let k = c.k();
        for u in &self.classes {
            let class = c.classes.get_mut(u.index).ok_or_else(|| format!("class {} does not exist (K = {k})", u.index))?;
            if let Some(n) = &u.name {
                let n = n.trim();
                if n.chars().count() > MAX_CLASS_NAME {
                    return Err(format!("class names are at most {MAX_CLASS_NAME} characters"));
                }
                class.name = (!n.is_empty()).then(|| n.to_string());
            }
            if let Some(color) = u.color {
                class.color = Some(color);
            }
        }
        Ok(c)
    }
}

//! The server's vocabulary, shared by every layer above it: jobs, datasets and model versions as
//! the API shows them and the stores keep them, with the rules that are theirs (names, limits).
//! It depends on nothing else of the server.

pub mod datasets;
pub mod jobs;
pub mod models;

use serde::Deserialize;
use utoipa::IntoParams;

/// Names that reach the filesystem or an object key: letters, digits, `.`, `_`, `-`, not
/// starting with a dot, at most 100 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A page of a listing.
#[derive(Deserialize, IntoParams, Clone, Copy, Debug, PartialEq, Eq)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// How many entries to skip (default 0).
    #[serde(default)]
    pub offset: usize,
    /// How many to return (default 100, at most 1000).
    #[serde(default = "Page::default_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: usize,
}

impl Page {
    pub const MAX_LIMIT: usize = 1000;

    fn default_limit() -> usize {
        100
    }

    /// The page, or what is wrong with it (a limit outside 1 to [`Page::MAX_LIMIT`]).
    pub fn checked(self) -> Result<Self, String> {
        if (1..=Self::MAX_LIMIT).contains(&self.limit) {
            Ok(self)
        } else {
            Err(format!("limit must be between 1 and {} (got {})", Self::MAX_LIMIT, self.limit))
        }
    }

    /// The page with its limit within 1 to [`Page::MAX_LIMIT`].
    pub fn clamped(self) -> Self {
        Self { offset: self.offset, limit: self.limit.clamp(1, Self::MAX_LIMIT) }
    }

    /// The page's part of `items`.
    pub fn slice<T: Clone>(self, items: &[T]) -> Vec<T> {
        let p = self.clamped();
        items.iter().skip(p.offset).take(p.limit).cloned().collect()
    }
}

impl Default for Page {
    fn default() -> Self {
        Self { offset: 0, limit: Self::default_limit() }
    }
}

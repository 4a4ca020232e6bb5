//! Whether a `/segment` request may take a place, once its body is read and its image's size is
//! known from its header (before anything is decoded): a cap on requests in flight, a budget of
//! pixels in flight (a decoded image, its mask and the work on them cost about ten bytes a pixel,
//! so a small PNG of a huge image must not be let in thirty times over), and a bound on the
//! inference queue's expected wait. A refusal says when to come back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::inference::{Inference, Ticket};

/// Pixels are counted in units of this many (semaphore permits are 32-bit).
const UNIT: u64 = 1024;

pub struct Admission {
    slots: Arc<Semaphore>,
    pixels: Arc<Semaphore>,
    pixel_budget: u64,
    max_wait: Duration,
}

/// A request's place: its slot, its pixels and its place in the queue, given back when dropped.
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    _pixels: OwnedSemaphorePermit,
    pub ticket: Ticket,
}

#[derive(Debug, PartialEq)]
pub enum Refused {
    /// The image alone is over the budget of pixels in flight: it could never be admitted.
    TooLarge { pixels: u64, budget: u64 },
    /// Too much at once: come back after this long.
    Busy(Duration),
}

impl Admission {
    pub fn new(max_concurrent: usize, pixel_budget: u64, max_wait: Duration) -> Self {
        let units = pixel_budget.div_ceil(UNIT).clamp(1, u32::MAX as u64);
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            pixels: Arc::new(Semaphore::new(units as usize)),
            pixel_budget,
            max_wait,
        }
    }

    /// Admits an image of `pixels` pixels, or says why not.
    pub fn admit(&self, inference: &Inference, pixels: u64) -> Result<Admitted, Refused> {
        if pixels > self.pixel_budget {
            return Err(Refused::TooLarge { pixels, budget: self.pixel_budget });
        }
        let busy = || Refused::Busy(inference.estimated_wait().max(Duration::from_secs(1)));
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| busy())?;
        let units = pixels.div_ceil(UNIT).max(1) as u32;
        let px = self.pixels.clone().try_acquire_many_owned(units).map_err(|_| busy())?;
        let ticket = inference.admit(self.max_wait).map_err(Refused::Busy)?;
        Ok(Admitted { _slot: slot, _pixels: px, ticket })
    }

    /// Pixels of the requests admitted now.
    pub fn pixels_in_flight(&self) -> u64 {
        let free = self.pixels.available_permits() as u64 * UNIT;
        self.pixel_budget.div_ceil(UNIT).clamp(1, u32::MAX as u64) * UNIT - free
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::service::inference::InferenceConfig;

    fn idle() -> Inference {
        let config = InferenceConfig {
            capacity: 8,
            max_batch: 1,
            stall_after: Duration::from_secs(30),
            refine: Default::default(),
            initial_time_per_image: Duration::ZERO,
        };
        Inference::start_with(config, Arc::new(|_, _, _| Ok(vec![])))
    }

    #[tokio::test]
    async fn large_images_are_weighed_by_their_pixels() {
        let inference = idle();
        let admission = Admission::new(32, 50_000_000, Duration::from_secs(10));
        assert!(matches!(admission.admit(&inference, 60_000_000), Err(Refused::TooLarge { .. })));
        let a = admission.admit(&inference, 36_000_000).expect("one 6000 x 6000 image fits");
        assert!(matches!(admission.admit(&inference, 36_000_000), Err(Refused::Busy(_))), "a second does not");
        let small = admission.admit(&inference, 480 * 360).expect("a street frame still fits beside it");
        assert!(admission.pixels_in_flight() >= 36_000_000 + 480 * 360);
        drop((a, small));
        assert_eq!(admission.pixels_in_flight(), 0);
        admission.admit(&inference, 36_000_000).expect("the pixels came back");
    }

    #[tokio::test]
    async fn the_slot_count_caps_requests_in_flight() {
        let inference = idle();
        let admission = Admission::new(2, 100_000_000, Duration::from_secs(10));
        let held: Vec<_> = (0..2).map(|_| admission.admit(&inference, 100).unwrap()).collect();
        assert!(matches!(admission.admit(&inference, 100), Err(Refused::Busy(_))));
        drop(held);
        assert!(admission.admit(&inference, 100).is_ok());
    }
}

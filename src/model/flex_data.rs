//! Flex tensors in and out of the project's training kernels (`batchnorm`, `conv`).

use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

/// A contiguous f32 copy-or-view of a Flex tensor, with its first two dimensions (N, C) and the
/// elements of one (sample, channel) plane.
pub(crate) fn planes(x: &FlexTensor) -> (FlexTensor, usize, usize, usize) {
    assert_eq!(x.dtype(), DType::F32, "the training kernels run on f32");
    let x = x.to_contiguous();
    let dims = x.layout().shape().clone();
    let (n, c) = (dims[0], dims[1]);
    let inner = x.layout().num_elements() / (n * c).max(1);
    (x, n, c, inner)
}

/// A Flex tensor of `shape` holding `values`.
pub(crate) fn flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

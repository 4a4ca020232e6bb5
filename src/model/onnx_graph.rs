//! A small builder for hand-written ONNX graphs. Each model module emits its own nodes next to
//! its burn `forward`, so the exported graph and the training graph are read side by side.

use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension, AttributeProto, GraphProto, ModelProto,
    NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The ONNX opset the exporter targets (Resize with scales, ReduceSum with axes as input).
pub const OPSET: i64 = 17;

/// A graph dimension: fixed, or a named symbol that stays dynamic.
pub enum Dim {
    Fixed(i64),
    Symbol(&'static str),
}

#[derive(Default)]
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// Adds a float32 constant (weights, biases, normalisation constants); returns its name.
    pub fn constant_f32(&mut self, hint: &str, shape: &[usize], data: Vec<f32>) -> String {
        let name = self.fresh(hint);
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = DataType::FLOAT as i32;
        t.dims = shape.iter().map(|&d| d as i64).collect();
        t.raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(t);
        name
    }

    pub fn constant_i64(&mut self, hint: &str, data: Vec<i64>) -> String {
        let shape = [data.len()];
        self.constant_i64_shaped(hint, &shape, data)
    }

    /// An int64 constant of any shape (`&[]`: a scalar, as `Gather` takes to drop an axis).
    pub fn constant_i64_shaped(&mut self, hint: &str, shape: &[usize], data: Vec<i64>) -> String {
        let name = self.fresh(hint);
        let mut t = TensorProto::new();
        t.name = name.clone();
        t.data_type = DataType::INT64 as i32;
        t.dims = shape.iter().map(|&d| d as i64).collect();
        t.raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(t);
        name
    }

    /// Adds a node with one output; returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let output = self.fresh(&op.to_lowercase());
        let mut n = NodeProto::new();
        n.name = format!("{output}_node");
        n.op_type = op.to_string();
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![output.clone()];
        n.attribute = attributes;
        self.nodes.push(n);
        output
    }

    /// Renames the last node's output, so graph outputs get stable public names.
    pub fn rename_last_output(&mut self, name: &str) -> String {
        let n = self.nodes.last_mut().expect("graph has nodes");
        n.output[0] = name.to_string();
        name.to_string()
    }

    pub fn finish(self, name: &str, inputs: Vec<ValueInfoProto>, outputs: Vec<ValueInfoProto>, doc: &str) -> ModelProto {
        let mut graph = GraphProto::new();
        graph.name = name.into();
        graph.node = self.nodes;
        graph.initializer = self.initializers;
        graph.input = inputs;
        graph.output = outputs;
        let mut model = ModelProto::new();
        model.ir_version = 8;
        model.producer_name = "picie".into();
        model.producer_version = env!("CARGO_PKG_VERSION").into();
        model.doc_string = doc.into();
        let mut opset = OperatorSetIdProto::new();
        opset.domain = String::new();
        opset.version = OPSET;
        model.opset_import = vec![opset];
        model.graph = protobuf::MessageField::some(graph);
        model
    }
}

pub fn value_info_f32(name: &str, dims: &[Dim]) -> ValueInfoProto {
    value_info(name, DataType::FLOAT, dims)
}

/// A graph input or output of element type `elem` (e.g. `DataType::UINT8` for 8-bit images).
pub fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = onnx_protobuf::tensor_shape_proto::Dimension::new();
        dim.value = Some(match d {
            Dim::Fixed(v) => dimension::Value::DimValue(*v),
            Dim::Symbol(s) => dimension::Value::DimParam(s.to_string()),
        });
        shape.dim.push(dim);
    }
    let mut tensor = onnx_protobuf::type_proto::Tensor::new();
    tensor.elem_type = elem as i32;
    tensor.shape = protobuf::MessageField::some(shape);
    let mut ty = TypeProto::new();
    ty.value = Some(onnx_protobuf::type_proto::Value::TensorType(tensor));
    let mut vi = ValueInfoProto::new();
    vi.name = name.to_string();
    vi.type_ = protobuf::MessageField::some(ty);
    vi
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INTS.into();
    a.ints = values.to_vec();
    a
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::INT.into();
    a.i = value;
    a
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::FLOAT.into();
    a.f = value;
    a
}

pub fn attr_string(name: &str, value: &str) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = AttributeType::STRING.into();
    a.s = value.as_bytes().to_vec();
    a
}

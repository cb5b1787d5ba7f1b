use duo_engine::{MethodSpec, Runner};
use duo_model::{Checkpoint, LoadedModel, ModelSource, Model};
fn main() {
    let mut m = LoadedModel::load(&ModelSource::Default).unwrap();
    let ids: Vec<u32> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    for style in [duo_core::RopeStyle::Interleaved, duo_core::RopeStyle::HalfSplit] {
        let ck = Checkpoint::open(&m.path).unwrap();
        let mut c = ck.config().unwrap();
        c.rope_style = style;
        m.model = Model::load(&ck, c).unwrap();
        let r = Runner::new(&m, MethodSpec { chunk: std::env::var("CHUNK").map(|c| c.parse().unwrap()).unwrap_or(4096), ..Default::default() }.resolve(m.model.config()).unwrap());
        let mut kv = r.method.new_cache();
        let l = r.prefill(&ids, &mut kv, |_| {}).unwrap();
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        for &i in &idx[..5] { print!("{i}:{:.4} ", l[i]); }
        println!();
    }
}

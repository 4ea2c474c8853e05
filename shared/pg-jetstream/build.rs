// embed_migrations! reads the directory at compile time; without this a new
// migration would not rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

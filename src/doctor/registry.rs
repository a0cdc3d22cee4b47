//! The registry check: when the images came from an intranet registry (`install --images-from`,
//! recorded in the install journal) or the install config names one (`[registry] url`), every
//! image of the stack must be there with the bundle's id: it is where the next install, on this
//! host or another, pulls them from. An unreachable registry is a finding like any other link.

use super::{Ctx, Finding, Link, Severity, PROBE};
use crate::install::registry::Source;
use crate::ports::Docker;
use crate::registry::client::{self, Presence, Wanted};

pub(super) async fn check(ctx: &mut Ctx<'_>, docker: &Link<&dyn Docker>) {
    let opts = ctx.opts;
    let Some(text) = opts.images_from.as_deref().or(opts.config.registry.url.as_deref()) else {
        return;
    };
    let source = match Source::resolve(Some(text), &opts.registry, &opts.config.registry) {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => return ctx.add_error("registry", format!("registry {text}"), e),
    };
    let registry = source.target.to_string();
    // The ids to find there: the bundle's (--bundle), else those of the images the stack's
    // containers run (install checked them against the bundle it installed).
    let expected: Vec<(String, String)> = match &ctx.manifest {
        Some(m) => m
            .images
            .iter()
            .filter_map(|i| i.refs.first().map(|r| (r.clone(), i.id.clone())))
            .collect(),
        None => running_images(ctx, docker).await,
    };
    if expected.is_empty() {
        ctx.add(
            "registry",
            Severity::Info,
            format!("registry {registry}"),
            "not checked: no bundle given and no container of the stack to take the images' ids from",
        )
        .fix("give --bundle BUNDLE (the bundle that was installed)");
        return;
    }
    let mut wanted = Vec::new();
    for (reference, id) in expected {
        match source.target.place(&reference) {
            Ok(placement) => wanted.push(Wanted {
                placement,
                image_id: id,
            }),
            Err(e) => ctx.add_error("registry", format!("image {reference}"), e),
        }
    }
    if wanted.is_empty() {
        return;
    }
    let asked = async {
        let c = client::Client::new(&source.target.host, &source.access)?;
        client::check_images(&c, &source.target, &wanted).await
    };
    let presences = match tokio::time::timeout(PROBE * 4, asked).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let mut f = Finding::from_error("registry", format!("registry {registry}"), e);
            f.message = format!("cannot check the stack's images there: {}", f.message);
            ctx.findings.push(f);
            return;
        }
        Err(_) => {
            ctx.add(
                "registry",
                Severity::Error,
                format!("registry {registry}"),
                format!(
                    "did not answer within {} s: the stack's images there were not checked",
                    (PROBE * 4).as_secs()
                ),
            )
            .fix(format!(
                "curl -v https://{}/v2/   (is the registry up and reachable from this host?)",
                source.target.host
            ));
            return;
        }
    };
    let bundle = ctx.bundle_arg();
    for (w, presence) in wanted.iter().zip(presences) {
        let subject = format!("image {}", w.placement.source);
        match presence {
            Presence::Present { .. } => {}
            Presence::Missing => {
                ctx.add(
                    "registry",
                    Severity::Error,
                    subject,
                    format!("not in registry {registry}: the next install from it (--images-from) stops here"),
                )
                .evidence(format!("{}: no such tag", w.placement.reference))
                .evidence(format!("expected image {}", w.image_id))
                .fix(format!("bkbundle push {bundle} --registry {registry}"));
            }
            Presence::Other { config_digest } => {
                ctx.add(
                    "registry",
                    Severity::Error,
                    subject,
                    format!("registry {registry} has another image under its name"),
                )
                .evidence(format!("{} is image {config_digest}", w.placement.reference))
                .evidence(format!("expected image {} (the bundle's)", w.image_id))
                .fix(format!(
                    "bkbundle push {bundle} --registry {registry}   (puts the bundle's image back under that name)"
                ));
            }
        }
    }
}

/// The images the stack's containers run, by the reference they were created from, each once.
async fn running_images(ctx: &Ctx<'_>, docker: &Link<&dyn Docker>) -> Vec<(String, String)> {
    let (Some(project), Ok(docker)) = (ctx.project(), docker) else {
        return Vec::new();
    };
    let Ok(containers) = docker.project_containers(&project).await else {
        return Vec::new();
    };
    let mut seen = std::collections::BTreeMap::new();
    for c in containers {
        if !c.image.is_empty() && !c.image_id.is_empty() && !c.image.starts_with("sha256:") {
            seen.entry(c.image).or_insert(c.image_id);
        }
    }
    seen.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::super::testing::no_env;
    use super::super::{Ctx, DoctorOptions, Link, Severity};
    use crate::manifest::Manifest;
    use crate::ports::Docker;

    fn manifest(refs: &[&str]) -> Manifest {
        let mut text = String::from(
            "format = 1\n[bundle]\nname = \"d\"\nversion = \"1\"\ncreated = \"x\"\ncreated_by = \"x\"\ncompression = \"zstd\"\nwithout_layers = true\n",
        );
        for i in 0..refs.len() {
            let hex = format!("{:064x}", i + 1);
            text.push_str(&format!(
                "[[files]]\npath = \"images/configs/{hex}.json\"\nsize = 1\nsha256 = \"{hex}\"\n"
            ));
        }
        for (i, r) in refs.iter().enumerate() {
            let hex = format!("{:064x}", i + 1);
            text.push_str(&format!(
                "[[images]]\nrefs = [\"{r}\"]\nid = \"sha256:{hex}\"\nconfig = \"images/configs/{hex}.json\"\nos = \"linux\"\narch = \"amd64\"\nlayers = []\nsize = 0\n"
            ));
        }
        Manifest::parse(&text, "test").unwrap()
    }

    async fn run(opts: &DoctorOptions, m: Option<Manifest>) -> Vec<super::Finding> {
        let mut ctx = Ctx::new(opts, &no_env);
        ctx.manifest = m;
        let no_docker: Link<&dyn Docker> = Err(vec![]);
        super::check(&mut ctx, &no_docker).await;
        ctx.findings
    }

    #[tokio::test]
    async fn no_registry_no_check() {
        assert!(run(&DoctorOptions::default(), Some(manifest(&["a:1"])))
            .await
            .is_empty());
    }

    #[tokio::test]
    async fn without_the_bundle_it_says_what_it_needs() {
        let opts = DoctorOptions {
            images_from: Some("reg.intranet:5000/site".into()),
            ..Default::default()
        };
        let f = run(&opts, None).await;
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!((f[0].check, f[0].severity), ("registry", Severity::Info));
        assert_eq!(f[0].subject, "registry reg.intranet:5000/site");
        assert!(f[0].fix.as_deref().unwrap().contains("--bundle"));
    }

    #[tokio::test]
    async fn without_the_bundle_the_stacks_running_images_are_checked() {
        let port = super::super::testing::closed_port();
        let opts = DoctorOptions {
            images_from: Some(format!("127.0.0.1:{port}")),
            project: Some("bk".into()),
            registry: crate::registry::Access {
                insecure: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let docker = crate::ports::fakes::FakeDocker {
            containers: vec![crate::ports::fakes::container("bk", "web", "running", None)],
            ..Default::default()
        };
        let mut ctx = Ctx::new(&opts, &no_env);
        let link: Link<&dyn Docker> = Ok(&docker);
        super::check(&mut ctx, &link).await;
        let f = ctx.findings;
        // The registry was asked (it is down): not the "give --bundle" note.
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!((f[0].check, f[0].severity), ("registry", Severity::Error), "{f:#?}");
        assert!(
            f[0].message.starts_with("cannot check the stack's images there"),
            "{}",
            f[0].message
        );
        let images = super::running_images(&Ctx::new(&opts, &no_env), &link).await;
        assert_eq!(images, vec![("bk/web:1".to_string(), format!("sha256:{:0>64}", 3))]);
    }

    #[tokio::test]
    async fn an_unreachable_registry_is_a_finding_naming_it() {
        let port = super::super::testing::closed_port();
        let mut opts = DoctorOptions::default();
        // From the install config, when the journal records none.
        opts.config.registry.url = Some(format!("127.0.0.1:{port}"));
        opts.config.registry.insecure = true;
        let f = run(&opts, Some(manifest(&["a:1", "b/c:2"]))).await;
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!((f[0].check, f[0].severity), ("registry", Severity::Error));
        assert_eq!(f[0].subject, format!("registry 127.0.0.1:{port}"));
        assert!(
            f[0].message.starts_with("cannot check the stack's images there"),
            "{}",
            f[0].message
        );
    }

    #[tokio::test]
    async fn a_reference_the_registry_cannot_hold_is_named() {
        let opts = DoctorOptions {
            images_from: Some(format!("127.0.0.1:{}", super::super::testing::closed_port())),
            ..Default::default()
        };
        let f = run(&opts, Some(manifest(&["Upper/Case:1"]))).await;
        assert_eq!(f[0].subject, "image Upper/Case:1", "{f:#?}");
        assert_eq!(f.len(), 1, "nothing else to ask the registry: {f:#?}");
    }
}

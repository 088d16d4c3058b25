import Foundation
import VMTemplateOS
import VMTemplateStore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Templates between nodes (docs/distribution.md): push to and pull from OCI registries by
/// digest, export to and import from OCI image layouts for nodes without one.
public struct TemplateDistribution: Sendable {
    public let store: TemplateStore
    /// `--qemu`: the QEMU a pulled template must load into.
    public let explicitQEMU: String?

    public init(store: TemplateStore, explicitQEMU: String? = nil) {
        self.store = store
        self.explicitQEMU = explicitQEMU
    }

    /// Pushes template `name` to `reference` (its tag, or by digest alone); returns what a pull
    /// names: the manifest's digest.
    public func push(_ name: EntityName, to reference: ImageReference, options: RegistryOptions) async throws -> PackResult {
        guard reference.digest == nil else {
            throw VMTemplateError(.invalidArgument, "push to a tag (HOST/REPOSITORY:TAG), not a digest: the digest is what the push prints.")
        }
        let registry = try RegistryClient(reference, options: options, push: true)
        await registry.chooseScheme()
        do {
            let result = try await TemplatePacker(store: store).pack(name, to: registry, tag: reference.tag)
            await registry.shutdown()
            return result
        } catch {
            await registry.shutdown()
            throw error
        }
    }

    /// Pulls `reference` and publishes it as `name` (default: its name where it was made).
    public func pull(_ reference: ImageReference, name: EntityName?, options: RegistryOptions) async throws -> ReceiveResult {
        let registry = try RegistryClient(reference, options: options, push: false)
        await registry.chooseScheme()
        do {
            let result = try await TemplateReceiver(store: store, explicitQEMU: explicitQEMU).receive(reference.manifestReference, from: registry, name: name, source: .init(reference: reference.description))
            await registry.shutdown()
            return result
        } catch {
            await registry.shutdown()
            throw error
        }
    }

    /// Writes template `name` into an OCI image layout: a directory at `path` (made if needed,
    /// it may hold other images), or a new tar file when `path` ends in `.tar`; under `tag`
    /// (default: the template's name).
    public func export(_ name: EntityName, to path: String, tag: String?) async throws -> PackResult {
        guard path.hasSuffix(".tar") else {
            return try await TemplatePacker(store: store).pack(name, to: try OCILayoutDirectory.create(at: path), tag: tag ?? name.value)
        }
        let archive = try OCIArchiveWriter(path: path)
        do {
            let result = try await TemplatePacker(store: store).pack(name, to: archive, tag: tag ?? name.value)
            try archive.finish()
            return result
        } catch {
            archive.abandon()
            throw error
        }
    }

    /// Publishes the template of the OCI image layout at `path`, a directory or a tar file
    /// (`image`: a tag or digest in it, needed when it holds several).
    public func importLayout(_ path: String, image: String?, name: EntityName?) async throws -> ReceiveResult {
        var info = stat()
        let files: any LayoutFiles = stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR ? try OCILayoutDirectory.open(path) : try OCIArchive.open(path)
        return try await TemplateReceiver(store: store, explicitQEMU: explicitQEMU).receive(image ?? "", from: OCILayout(files: files), name: name, source: .init(reference: "oci-layout:\(path)\(image.map { ":\($0)" } ?? "")"))
    }
}

import Foundation
import VMTemplateOS
import VMTemplateStore

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

    /// Writes template `name` into the OCI image layout at `directory` (made if needed), under
    /// `tag` (default: the template's name).
    public func export(_ name: EntityName, to directory: String, tag: String?) async throws -> PackResult {
        let layout = try OCILayout.create(at: directory)
        return try await TemplatePacker(store: store).pack(name, to: layout, tag: tag ?? name.value)
    }

    /// Publishes the template of the OCI image layout at `directory` (`image`: a tag or digest in
    /// it, needed when it holds several).
    public func importLayout(_ directory: String, image: String?, name: EntityName?) async throws -> ReceiveResult {
        let layout = try OCILayout.open(directory)
        return try await TemplateReceiver(store: store, explicitQEMU: explicitQEMU).receive(image ?? "", from: layout, name: name, source: .init(reference: "oci-layout:\(directory)\(image.map { ":\($0)" } ?? "")"))
    }
}

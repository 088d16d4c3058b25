import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// `vmtemplate rm-template`: a template goes with its warm pool, and with its clones only when
/// asked (`force`).
public struct TemplateRemoval: Sendable {
    public let store: TemplateStore

    public init(store: TemplateStore) {
        self.store = store
    }

    /// Removes template `name`. Refused while clones of this store run from it, unless `force`,
    /// which stops them first (as `rm` does). Returns the clones it removed.
    public func remove(_ name: EntityName, force: Bool, grace: Duration = .seconds(3)) async throws -> [CloneRecord] {
        guard store.templateExists(name) else {
            throw VMTemplateError(.notFound, "no template named '\(name)': see 'vmtemplate list'.")
        }
        // Its warm pool goes first: members are no one's clones yet. Once the pool's size is 0
        // no filler lists another member (it checks under the store lock); one listed between the
        // drain and that moment is still recorded pooled, and goes too.
        let pool = WarmPool(launcher: CloneLauncher(store: store))
        await pool.drain(name)
        try await store.pools.remove(name)
        await pool.removeStrays(of: name)
        let users = store.clones().records.filter { $0.template == name.value && $0.templateStore == nil && $0.isLive && $0.state != .pooled && $0.state != .warming }
        if !users.isEmpty && !force {
            throw VMTemplateError(.busy, "template '\(name)' is used by \(users.count) running clone\(users.count == 1 ? "" : "s") (\(users.map(\.name).joined(separator: ", "))): remove them first (vmtemplate rm), or pass --force to stop them.")
        }
        for record in users {
            do {
                try await CloneLifecycle(store: store).remove(record, grace: grace, reason: "template-removed")
            } catch let error as VMTemplateError where error.code == .notFound {
                // Removed meanwhile by somebody else: gone either way.
            }
        }
        try await store.removeTemplateFiles(name)
        return users
    }
}

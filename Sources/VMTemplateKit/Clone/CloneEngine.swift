import Foundation
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// `clone`'s front door: a ready member of the template's warm pool if there is one
/// (``WarmPool/handOut(_:template:started:)``), else a fresh clone (``CloneLauncher``), resumed
/// and told its clock and hostname.
public struct CloneEngine: Sendable {
    public let launcher: CloneLauncher

    public init(store: TemplateStore, templates: TemplateStore? = nil, explicitQEMU: String? = nil) {
        launcher = CloneLauncher(store: store, templates: templates, explicitQEMU: explicitQEMU)
    }

    public var store: TemplateStore { launcher.store }
    public var pool: WarmPool { WarmPool(launcher: launcher) }

    /// Starts a clone and returns once its guest runs.
    public func clone(_ request: CloneRequest) async throws -> (record: CloneRecord, warning: String?) {
        let started = ContinuousClock.now
        try request.validate()
        let template = try launcher.template(request.template)
        // A pool belongs to a store's own templates.
        if request.usePool, launcher.templates.root == store.root,
           let record = try await pool.handOut(request, template: template, started: started) {
            return (record, nil)
        }
        var launched = try await launcher.launch(request, from: template, state: .starting, started: started)
        do {
            defer { launched.qmp.close() }
            try await launched.qmp.cont()
            let paths = store.clonePaths(launched.record.id)
            launched.record.clock = GuestSetup.start(template.manifest.guestClock ?? .none, name: launched.record.name, controlSocket: paths.controlSocket, logPath: store.cloneLayout(launched.record.id).guestSetupLog, inChild: request.guestRepliesInChild)
            launched.timings.resume = launched.lap.next()
            launched.record.state = .running
            launched.record.restoreSeconds = started.duration(to: .now).seconds
            try store.saveTimed(&launched.record, timings: launched.timings, lap: &launched.lap, started: started)
            return (launched.record, launched.warning)
        } catch {
            await launcher.discard(launched)
            throw error
        }
    }
}

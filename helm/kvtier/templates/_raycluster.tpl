{{/*
The Ray cluster: a head and three worker groups (prefill, decode: GPU; cache
shards: CPU, memory from the warm budget). Shared by the RayService
(spec.rayClusterConfig) and the RayCluster (spec). Field names follow the
KubeRay ray.io/v1 CRDs.

Each worker group offers a Ray custom resource so that work lands on its pods:
kvtier_shard (warm shard actors), kvtier_prefill and kvtier_decode (the Serve
deployments). The head runs no work (num-cpus 0) but the tier's controller
(an actor of 0 CPUs) and, without Serve, the `kvtier start` loop.
*/}}

{{- define "kvtier.rayResources" -}}
{{- /* KubeRay passes rayStartParams.resources verbatim to `ray start --resources=<value>`
       in a shell, so the value is a double-quoted JSON string: "{\"kvtier_shard\":1}". */ -}}
{{- toJson (toJson .) -}}
{{- end -}}

{{/* Call with (dict "root" $ "group" $g "component" name "containerName" name "head" bool "resources" res "shmBytes" n) */}}
{{- define "kvtier.podTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
metadata:
  labels:
    {{- include "kvtier.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A change of the tier config changes the pods (for a RayService: a new cluster).
    checksum/config: {{ include "kvtier.config" $root | sha256sum }}
    {{- with $root.Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- with (include "kvtier.serviceAccountName" $root) }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .containerName }}
      {{- include "kvtier.image" (dict "root" $root "group" $g) | nindent 6 }}
      {{- if not $root.Values.serve.enabled }}
      # RayCluster mode sets ray.io/overwrite-container-cmd: KubeRay's ray start
      # command is in $KUBERAY_GEN_RAY_START_CMD (eval: it holds quoted JSON).
      command: ["/bin/bash", "-lc", "--"]
      args:
        - |-
          ulimit -n 65536
          {{- if .head }}
          # The tier's actors (controller, warm shards) are started by `kvtier start`
          # once Ray is up, and started again if it exits; they are detached and
          # named, so a restart joins the running tier instead of making another.
          (
            until ray health-check --address 127.0.0.1:6379 >/dev/null 2>&1; do sleep 2; done
            while true; do
              kvtier start --address auto
              echo "kvtier start exited with status $?; starting it again in 5 s" >&2
              sleep 5
            done
          ) &
          {{- end }}
          eval "$KUBERAY_GEN_RAY_START_CMD"
      {{- end }}
      env:
        {{- include "kvtier.env" $root | nindent 8 }}
      ports:
        {{- if .head }}
        - {containerPort: 6379, name: gcs-server}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
        {{- if $root.Values.serve.enabled }}
        - {containerPort: {{ $root.Values.serve.port }}, name: serve}
        {{- end }}
        {{- end }}
        - {containerPort: 8080, name: metrics}
      resources:
        {{- toYaml .resources | nindent 8 }}
      volumeMounts:
        {{- include "kvtier.volumeMounts" $root | nindent 8 }}
      {{- with $root.Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  volumes:
    {{- include "kvtier.volumes" (dict "root" $root "shmBytes" .shmBytes) | nindent 4 }}
{{- end -}}

{{/* Container resources of a GPU group: the user's, plus the GPU limit. */}}
{{- define "kvtier.gpuGroupResources" -}}
{{- $res := deepCopy (default (dict) .group.resources) -}}
{{- if gt (int64 .group.gpus) 0 -}}
{{- $lim := default (dict) $res.limits -}}
{{- $_ := set $lim .root.Values.gpuResourceName (int64 .group.gpus) -}}
{{- $_ := set $res "limits" $lim -}}
{{- end -}}
{{- toJson $res -}}
{{- end -}}

{{- define "kvtier.gpuWorkerGroup" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $slots := max 1 (int64 $g.gpus) -}}
{{- /* kvtier_<group> places pd engines, kvtier_engine shared-shape engines: one unit per GPU (per engine rank) */ -}}
{{- $params := dict "metrics-export-port" "8080" "resources" (include "kvtier.rayResources" (dict (printf "kvtier_%s" .name) $slots "kvtier_engine" $slots)) -}}
{{- if gt (int64 $g.gpus) 0 -}}{{- $_ := set $params "num-gpus" (toString (int64 $g.gpus)) -}}{{- end -}}
- groupName: {{ .name }}
  replicas: {{ int64 $g.replicas }}
  minReplicas: {{ int64 $g.replicas }}
  maxReplicas: {{ int64 $g.replicas }}
  rayStartParams:
    {{- toYaml (merge (deepCopy (default (dict) $g.rayStartParams)) $params) | nindent 4 }}
  template:
    {{- include "kvtier.podTemplate" (dict "root" $root "group" $g "component" .name "containerName" "ray-worker" "head" false "resources" (include "kvtier.gpuGroupResources" . | fromJson) "shmBytes" 0) | nindent 4 }}
{{- end -}}

{{- define "kvtier.rayClusterSpec" -}}
{{- $c := .Values.cacheShards -}}
{{- $objectStore := include "kvtier.shardObjectStoreBytes" . | int64 -}}
{{- $shardMem := include "kvtier.mib" (include "kvtier.shardMemoryBytes" . | int64) -}}
{{- $shardRes := dict "requests" (dict "cpu" (toString $c.cpu) "memory" $shardMem) "limits" (dict "cpu" (toString $c.cpu) "memory" $shardMem) -}}
{{- $shardParams := dict "metrics-export-port" "8080" "object-store-memory" (toString $objectStore) "resources" (include "kvtier.rayResources" (dict "kvtier_shard" (int64 $c.shardsPerPod))) -}}
{{- $headParams := dict "dashboard-host" "0.0.0.0" "metrics-export-port" "8080" "num-cpus" "0" -}}
rayVersion: {{ .Values.rayVersion | quote }}
enableInTreeAutoscaling: false
headGroupSpec:
  serviceType: {{ .Values.head.serviceType }}
  rayStartParams:
    {{- toYaml (merge (deepCopy (default (dict) .Values.head.rayStartParams)) $headParams) | nindent 4 }}
  template:
    {{- include "kvtier.podTemplate" (dict "root" . "group" .Values.head "component" "head" "containerName" "ray-head" "head" true "resources" .Values.head.resources "shmBytes" 0) | nindent 4 }}
workerGroupSpecs:
  {{- include "kvtier.gpuWorkerGroup" (dict "root" . "group" .Values.prefill "name" "prefill") | nindent 2 }}
  {{- include "kvtier.gpuWorkerGroup" (dict "root" . "group" .Values.decode "name" "decode") | nindent 2 }}
  - groupName: cache-shards
    replicas: {{ int64 $c.replicas }}
    minReplicas: {{ int64 $c.replicas }}
    maxReplicas: {{ int64 $c.replicas }}
    rayStartParams:
      {{- toYaml (merge (deepCopy (default (dict) $c.rayStartParams)) $shardParams) | nindent 6 }}
    template:
      {{- include "kvtier.podTemplate" (dict "root" . "group" $c "component" "cache-shard" "containerName" "ray-worker" "head" false "resources" $shardRes "shmBytes" $objectStore) | nindent 6 }}
{{- end -}}
